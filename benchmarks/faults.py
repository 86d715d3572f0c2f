"""Fault-injection benchmark: kill the pipeline at random points, rerun it, and check what survived.

    .venv/bin/python benchmarks/faults.py [--trials 20] [--stores local,s3] [--seed 0] [--out FILE]
        [--workdir DIR] [--code DIR] [--atol 1e-5]

For each store kind (a local folder, and a bucket on a moto S3 server started here) it first runs the
pipeline uninterrupted, as the reference: shard sklearn's 8x8 digits (19 shards), pretrain a tiny ResNet
for 24 steps on 2 CPU ranks in fp32 with a checkpoint after every step, evaluate, publish. Then each trial
picks a stage (shard, pretrain, publish: a shuffled even mix) and a random kill point, kills it with
SIGKILL, checks that the kill exposed nothing half-written, and reruns it:
- shard: `LEJEPA_SHARD_CRASH_AFTER=N`, N drawn from 1 .. shards - 1, into a dataset of its own
  (`data.name`); the rerun must commit a manifest whose shards match their sha256 and hold every sample of
  the reference exactly once, byte for byte the reference's shards, and leave no lease file behind. The
  trial then pretrains on it, and the encoder must equal the reference's.
- pretrain: the `lejepa-pipeline pretrain` launcher is SIGKILLed once `checkpoints/latest.json` reaches a
  random step k (0 .. 24; 0 is during start-up), a random fraction of a measured step-and-checkpoint later,
  so kills land in training steps, checkpoint writes and S3 uploads, and the export. Its ranks must die
  with it, and `latest.json` must name a complete checkpoint. The rerun must take over the run's lease
  and resume: `latest.json` on the last step's complete checkpoint, the lease released, every step logged
  once with the reference's loss (the same batches in the same order), and the encoder equal to the
  reference's. Each kill is labelled from what it left: in start-up (no checkpoint), in a checkpoint (a
  tag newer than `latest.json` in the store, or in the local staging folder of an S3 run), in the export
  (the last step committed), else in training.
- publish: `LEJEPA_PUBLISH_CRASH_AFTER=N`, N drawn from 1 .. the release's file count, publishing the
  reference run under a model name of its own; no `latest.json` may appear before the rerun, which must
  leave `latest.json` on a release whose files match the sha256 in its `release.json`, with the
  reference's encoder, and no lease file behind.

"Encoder equal" means every tensor of `encoder.safetensors` within --atol (max abs difference) of the
uninterrupted run's; both are CPU fp32 runs (resumed runs have matched bit for bit). "Samples lost /
duplicated": for shard trials, reference samples missing from the committed shards / samples stored more
than once; for pretrain trials, the images of steps that trained on something else than the reference
(a logged loss more than 1e-4 off the reference's, or a step never trained) / of steps logged twice in
`metrics.jsonl`. A trial is "recovered" when the rerun exits 0, the stage's commit point is complete and
consistent (for pretrain also `metrics.jsonl`: one line per step), and the killed attempt exposed nothing.
Every process a stage starts carries a marker in its environment: "processes left behind" counts those
still alive 10 s after a kill (then killed), a failure of its own.

The pipeline runs only through its command line (`lejepa-pipeline STAGE --config ... --set ...`), each
stage in a subprocess, and results are read from the store's files (with boto3 on S3). --code DIR runs
the pipeline from another source tree (prepended to PYTHONPATH), e.g. `git archive HEAD | tar -x -C DIR`.
Everything lives in a temp folder (or --workdir, which is kept); the moto server and every process still
running are stopped at the end, Ctrl-C included. Prints one line per trial, then a Markdown table (also
written to --out).

Runtime on 2 shared cores: about 1 minute per store for the reference, then 5-40 s per trial (a pretrain
launch costs ~12-15 s of start-up): roughly 25-30 minutes for the default 2 x 20 trials.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lejepa.testing import moto_server, processes_with

BIN = Path(sys.executable).parent
STAGES = ("shard", "pretrain", "publish")
MAX_STEPS = 24
LOSS_TOLERANCE = 1e-4
MARK = "LEJEPA_FAULTS_BENCH"
"""Environment variable set on every stage process; children inherit it, so leftovers can be found."""
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# Tiny and fast: digits in 19 shards of 100, a 4-block ResNet of 16-128 channels (~0.3M parameters, a
# 4.4 MB checkpoint) on 2 ranks, a checkpoint after every step so kills often land in one.
CONFIG: dict[str, Any] = {
    "data": {"source": "digits"},
    "shard": {"samples_per_shard": 100, "workers": 2},
    "model": {
        "backbone": "resnet18",
        "small_input": True,
        "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
        "proj_hidden_dim": 128,
        "proj_dim": 64,
    },
    "views": {"local_views": 2},
    "loss": {"num_slices": 128},
    "pretrain": {
        "run_name": "reference",
        "batch_size": 32,
        "max_steps": MAX_STEPS,
        "checkpoint_every": 1,
        "log_every": 1,
        "num_workers": 1,
        "precision": "fp32",
    },
    "launch": {"nproc_per_node": 2, "accelerator": "cpu"},
    "evaluate": {
        "probe_epochs": 5,
        "baselines": False,
        "calibration_samples": 256,
        "diagnostic_samples": 256,
        "num_workers": 0,
        "device": "cpu",
        "precision": "fp32",
    },
    "publish": {"name": "reference", "beat_raw_pixels": False},
    "seed": 0,
}
IMAGES_PER_STEP = CONFIG["pretrain"]["batch_size"] * CONFIG["launch"]["nproc_per_node"]


# -- reading a store -------------------------------------------------------------------------------------


class Store:
    """Read-only access to a store root (a local folder or s3://bucket/prefix) by root-relative paths."""

    def __init__(self, root: str, endpoint: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.s3 = None
        if self.root.startswith("s3://"):
            import boto3

            self.bucket, _, self.prefix = self.root[len("s3://") :].partition("/")
            self.s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=AWS["AWS_DEFAULT_REGION"],
                aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
            )

    def rel(self, url: str) -> str:
        """The root-relative path of a URL the pipeline recorded (manifests and pointers hold full URLs)."""
        if not url.startswith(self.root + "/"):
            raise ValueError(f"{url} is not under {self.root}")
        return url[len(self.root) + 1 :]

    def read(self, path: str) -> bytes | None:
        if self.s3 is None:
            try:
                return Path(self.root, path).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{path}")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def read_json(self, path: str) -> Any:
        data = self.read(path)
        return None if data is None else json.loads(data)

    def children(self, path: str) -> list[str]:
        """Names of the files and folders directly under `path` ([] when there is none)."""
        if self.s3 is None:
            folder = Path(self.root, path)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        names = set()
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{path}/", Delimiter="/"
        )
        for page in pages:
            names |= {p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", [])}
            names |= {o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", [])}
        return sorted(names)

    def files(self, path: str) -> list[str]:
        """Paths, relative to `path`, of every file below it."""
        found = []
        for name in self.children(path):
            below = self.files(f"{path}/{name}")
            found += [f"{name}/{b}" for b in below] if below else [name]
        return found


def tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max(initial=0)) for k in a)


def losses(store: Store, run: str) -> list[tuple[int, float]]:
    """(step, loss) of every line of the run's metrics.jsonl, in order."""
    data = store.read(f"runs/{run}/metrics.jsonl") or b""
    return [(r["step"], r["loss"]) for r in map(json.loads, data.decode().splitlines()) if r]


def marker_step(store: Store, run: str) -> int | None:
    marker = store.read_json(f"runs/{run}/checkpoints/latest.json")
    return None if marker is None else marker["step"]


def dataset_samples(store: Store, manifest: dict[str, Any]) -> tuple[collections.Counter, dict, list[str]]:
    """({(split, sample id): copies} over the manifest's shards, {shard file: sha256}, problems found)."""
    samples: collections.Counter = collections.Counter()
    digests, problems = {}, []
    for entry in manifest["shards"]:
        name = entry["url"].rsplit("/", 1)[-1]
        data = store.read(store.rel(entry["url"]))
        if data is None:
            problems.append(f"{name} is listed but missing")
            continue
        digests[name] = hashlib.sha256(data).hexdigest()
        if digests[name] != entry["sha256"] or len(data) != entry["num_bytes"]:
            problems.append(f"{name} does not match its sha256 or size in the manifest")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            ids = [json.loads(tar.extractfile(m).read())["id"] for m in tar if m.name.endswith(".json")]
        if len(ids) != entry["num_samples"]:
            problems.append(f"{name} holds {len(ids)} samples, the manifest says {entry['num_samples']}")
        samples.update((entry["split"], i) for i in ids)
    return samples, digests, problems


def release_problems(store: Store, name: str) -> tuple[list[str], bytes | None]:
    """What is wrong with model `name`'s latest release ([] when complete), and its encoder weights."""
    latest = store.read_json(f"models/{name}/latest.json")
    if latest is None:
        return [f"models/{name}/latest.json is missing"], None
    folder = store.rel(latest["model_uri"])
    release = store.read_json(f"{folder}/release.json")
    if release is None:
        return [f"latest.json points to {folder}, which has no release.json"], None
    problems = [] if release["version"] == latest["version"] else ["latest.json and release.json disagree"]
    weights = None
    for file_name, entry in release["files"].items():
        data = store.read(f"{folder}/{file_name}")
        if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{folder}/{file_name} is missing or does not match release.json")
        elif file_name == "encoder.safetensors":
            weights = data
    return problems, weights


# -- running stages --------------------------------------------------------------------------------------


def marked_processes(mark: str) -> list[int]:
    """Processes whose environment holds MARK=<mark> exactly, or MARK=<mark>/... (every trial of a run)."""
    return processes_with(f"{MARK}={mark}", or_below=True)


def kill_marked(mark: str) -> list[str]:
    """SIGKILL every process still carrying `mark`; returns their command lines."""
    pids = [pid for pid in marked_processes(mark) if pid != os.getpid()]
    commands = []
    for pid in pids:
        with contextlib.suppress(OSError):
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return commands


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1].strip()[:300]


@dataclass
class StageProcess:
    """One `lejepa-pipeline STAGE` process, its log, and the marker that every process it starts carries."""

    popen: subprocess.Popen
    log: Path
    mark: str
    orphans: int = 0
    """Its processes still alive 10 s after it was killed (see Pipeline.stop)."""

    @property
    def killed(self) -> bool:
        return self.popen.returncode == -signal.SIGKILL


@dataclass
class Pipeline:
    """Starts `lejepa-pipeline` stages on one store, each as a subprocess with its own marker and TMPDIR."""

    work: Path
    config: Path
    env: dict[str, str]
    run_mark: str
    """Prefix of every marker this benchmark run sets."""

    def start(
        self, stage: str, label: str, sets: list[str], env: dict[str, str] | None = None
    ) -> StageProcess:
        tmp = self.work / "tmp" / label  # the same for a killed attempt and its rerun, as on one machine
        tmp.mkdir(parents=True, exist_ok=True)
        log = self.work / "logs" / f"{label}-{stage}-{time.monotonic_ns()}.log"
        log.parent.mkdir(exist_ok=True)
        command = [str(BIN / "lejepa-pipeline"), stage, "--config", str(self.config)]
        command += [a for s in sets for a in ("--set", s)] + (["--no-progress"] if stage == "shard" else [])
        with log.open("w") as out:
            popen = subprocess.Popen(
                command,
                cwd=self.work,  # the launcher's private folders go here, never into the checkout
                env={**self.env, **(env or {}), "TMPDIR": str(tmp), MARK: f"{self.run_mark}/{label}"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C here reaches only this script, which then stops them
            )
        return StageProcess(popen, log, f"{self.run_mark}/{label}")

    def run(
        self, stage: str, label: str, sets: list[str], env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """(exit status, last error line) of one stage run to its end (at most 10 minutes)."""
        proc = self.start(stage, label, sets, env)
        try:
            status = proc.popen.wait(timeout=600)
        except subprocess.TimeoutExpired:
            kill_marked(proc.mark)
            status = proc.popen.wait()
        return status, "" if status == 0 else last_error(proc.log)

    def stop(self, proc: StageProcess) -> None:
        """SIGKILL the stage process unless it has ended, and reap it (a zombie would still hold the run's
        lease); then count in proc.orphans its processes still alive 10 s later, and kill those."""
        if proc.popen.poll() is None:  # never signal a pid already reaped: it may be someone else's now
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
        if not wait_for(lambda: not marked_processes(proc.mark), 10, 0.2):
            left = kill_marked(proc.mark)
            proc.orphans = len(left)
            print(f"[faults]   still running 10 s after the kill: {' | '.join(left)}", flush=True)


# -- the reference and the trials ------------------------------------------------------------------------


@dataclass
class Reference:
    samples: collections.Counter
    digests: dict[str, str]
    encoder: dict[str, np.ndarray]
    losses: dict[int, float]
    tag_files: list[str]
    release_files: int
    startup_s: float
    """From the pretrain launch to its first committed checkpoint."""
    cycle_s: float
    """Median time between two committed checkpoints (a step and its checkpoint)."""


@dataclass
class Trial:
    store: str
    index: int
    stage: str
    kill_point: str = ""
    killed: bool = False
    orphans: int = 0
    """Processes of the killed stage still alive 10 s after the kill."""
    recovered: bool = False
    lost: int | None = None
    duplicated: int | None = None
    diff: float | None = None
    equal: bool | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def watched_pretrain(
    pipeline: Pipeline, store: Store, label: str, run: str, kill_at: tuple[int, float] | None = None
) -> tuple[StageProcess, list[tuple[float, int]]]:
    """Run pretrain for `run`, recording (seconds since launch, committed step) whenever latest.json moves.

    With kill_at=(k, delay), SIGKILL the launcher `delay` s after the committed step reaches k (k=0: after
    the launch), unless it has ended by then; `killed` on the returned process says which.
    """
    start = time.monotonic()
    proc = pipeline.start("pretrain", label, [f"pretrain.run_name={run}"])
    record: list[tuple[float, int]] = []
    deadline = start + 600 if kill_at is None else None
    while proc.popen.poll() is None:
        step = marker_step(store, run)
        now = time.monotonic()
        if step is not None and (not record or record[-1][1] != step):
            record.append((now - start, step))
        if deadline is None and (kill_at[0] == 0 or (step or 0) >= kill_at[0]):
            deadline = now + kill_at[1]
        if deadline is not None and now >= deadline:
            break
        time.sleep(0.05)
    pipeline.stop(proc)
    return proc, record


def run_reference(pipeline: Pipeline, store: Store) -> Reference:
    """The uninterrupted pipeline; raises RuntimeError naming the stage that failed."""

    def stage(name: str, sets: list[str] | None = None) -> None:
        status, error = pipeline.run(name, f"reference-{name}", sets or [])
        if status != 0:
            raise RuntimeError(f"uninterrupted {name} failed (exit {status}): {error}")

    stage("shard")
    manifest = store.read_json(store.rel(store.read_json("datasets/digits/latest.json")["manifest"]))
    samples, digests, problems = dataset_samples(store, manifest)
    proc, record = watched_pretrain(pipeline, store, "reference-pretrain", "reference")
    if proc.popen.returncode != 0:
        status = proc.popen.returncode
        raise RuntimeError(f"uninterrupted pretrain failed (exit {status}): {last_error(proc.log)}")
    stage("evaluate")
    stage("publish")
    release, weights = release_problems(store, "reference")
    encoder = tensors(store.read("runs/reference/encoder.safetensors"))
    if problems or release or weights is None or max_abs_diff(tensors(weights), encoder) != 0:
        raise RuntimeError(f"the uninterrupted pipeline left an inconsistent store: {problems + release}")
    tag = store.read_json("runs/reference/checkpoints/latest.json")["tag"]
    latest = store.read_json("models/reference/latest.json")
    times = [t for t, _ in record]
    return Reference(
        samples=samples,
        digests=digests,
        encoder=encoder,
        losses=dict(losses(store, "reference")),
        tag_files=store.files(f"runs/reference/checkpoints/{tag}"),
        release_files=len(store.read_json(f"{store.rel(latest['model_uri'])}/release.json")["files"]),
        startup_s=times[0],
        cycle_s=statistics.median(b - a for a, b in zip(times, times[1:], strict=False)),
    )


def leases_left(store: Store, folder: str) -> list[str]:
    """A problem for each lease file left under `folder` once its stage has ended."""
    return [f"{folder}/{f} left behind" for f in store.files(folder) if f.rsplit("/", 1)[-1] == "lease.json"]


def compare_encoder(trial: Trial, ref: Reference, weights: bytes | None, atol: float) -> None:
    if weights is None:
        trial.problems.append("no encoder.safetensors")
        return
    trial.diff = max_abs_diff(tensors(weights), ref.encoder)
    trial.equal = trial.diff <= atol


def shard_trial(
    trial: Trial, pipeline: Pipeline, store: Store, ref: Reference, rng: random.Random, atol: float
) -> None:
    name = f"t{trial.index:02d}"
    crash_after = rng.randint(1, len(ref.digests) - 1)
    trial.kill_point = f"after {crash_after} of {len(ref.digests)} shard files"
    proc = pipeline.start(
        "shard", name, [f"data.name={name}"], {"LEJEPA_SHARD_CRASH_AFTER": str(crash_after)}
    )
    proc.popen.wait(timeout=600)
    pipeline.stop(proc)
    trial.killed, trial.orphans = proc.killed, proc.orphans
    versions = [v for v in store.children(f"datasets/{name}") if not v.endswith(".json")]
    written = sum(f.endswith(".tar") for v in versions for f in store.children(f"datasets/{name}/{v}"))
    trial.notes.append(f"{written} shard file(s) left by the killed run")
    if store.read(f"datasets/{name}/latest.json") is not None or any(
        store.read(f"datasets/{name}/{v}/manifest.json") is not None for v in versions
    ):
        trial.problems.append("the killed shard stage committed a manifest")

    status, error = pipeline.run("shard", name, [f"data.name={name}"])
    if status != 0:
        trial.problems.append(f"shard rerun exited {status}: {error}")
        return
    pointer = store.read_json(f"datasets/{name}/latest.json")
    manifest = store.read_json(store.rel(pointer["manifest"]))
    samples, digests, problems = dataset_samples(store, manifest)
    trial.problems += problems + leases_left(store, f"datasets/{name}")
    trial.lost = len(ref.samples.keys() - samples.keys())
    trial.duplicated = sum(n - 1 for n in samples.values()) + len(samples.keys() - ref.samples.keys())
    if digests != ref.digests:
        trial.problems.append("the shards differ from the uninterrupted run's")
    trial.recovered = not trial.problems and trial.killed

    status, error = pipeline.run("pretrain", name, [f"data.name={name}", f"pretrain.run_name={name}"])
    if status != 0:
        trial.problems.append(f"pretrain on the recovered dataset exited {status}: {error}")
        return
    compare_encoder(trial, ref, store.read(f"runs/{name}/encoder.safetensors"), atol)


def where_killed(pipeline: Pipeline, store: Store, run: str, committed: int | None) -> str:
    """Where in the run a kill landed, judged from what it left (committed: the step latest.json names)."""

    def newer(tags: list[str]) -> list[str]:
        return [t for t in tags if committed is None or int(t[len("step") :]) > committed]

    uncommitted = newer([t for t in store.children(f"runs/{run}/checkpoints") if t.startswith("step")])
    # On S3 a checkpoint is saved to a local staging folder (under the trial's TMPDIR), then uploaded.
    staged = newer([p.name for p in (pipeline.work / "tmp" / run).rglob("step*") if p.is_dir()])
    if uncommitted:
        return f"in a checkpoint ({len(uncommitted)} newer than latest.json, step {committed}, in the store)"
    if staged:
        return f"in a checkpoint (saved locally for upload; latest.json: step {committed})"
    if committed is None:
        return "in start-up (no checkpoint yet)"
    if committed == MAX_STEPS:
        return f"in the export (latest.json: step {committed})"
    return f"in training (latest.json: step {committed})"


def pretrain_trial(
    trial: Trial, pipeline: Pipeline, store: Store, ref: Reference, rng: random.Random, atol: float
) -> None:
    run = f"t{trial.index:02d}"
    k, fraction = rng.randint(0, MAX_STEPS), rng.random()
    delay = fraction * (ref.startup_s if k == 0 else ref.cycle_s)
    proc, _ = watched_pretrain(pipeline, store, run, run, (k, delay))
    trial.killed, trial.orphans = proc.killed, proc.orphans
    if not trial.killed:  # nothing to recover; the finished run is still checked below
        trial.kill_point = f"nowhere: the run ended first (aimed at step {k} + {delay:.2f} s)"
        if proc.popen.returncode != 0:
            trial.problems.append(f"pretrain exited {proc.popen.returncode}: {last_error(proc.log)}")
            return
    else:
        committed = marker_step(store, run)
        trial.kill_point = (
            f"{where_killed(pipeline, store, run, committed)} (aimed at step {k} + {delay:.2f} s)"
        )
        if committed is not None:
            tag = f"step{committed:08d}"
            if store.files(f"runs/{run}/checkpoints/{tag}") != ref.tag_files:
                trial.problems.append(f"the killed run's latest.json names {tag}, which is incomplete")
        status, error = pipeline.run("pretrain", run, [f"pretrain.run_name={run}"])
        if status != 0:
            trial.problems.append(f"pretrain rerun exited {status}: {error}")
            return
    summary = store.read_json(f"runs/{run}/summary.json") or {}
    final = f"step{MAX_STEPS:08d}"
    if summary.get("steps") != MAX_STEPS or marker_step(store, run) != MAX_STEPS:
        trial.problems.append(f"the rerun ended at step {summary.get('steps')}, not {MAX_STEPS}")
    if store.files(f"runs/{run}/checkpoints/{final}") != ref.tag_files:
        trial.problems.append(f"the final checkpoint {final} is incomplete")
    trial.problems += leases_left(store, f"runs/{run}")
    log = losses(store, run)
    logged = collections.Counter(step for step, _ in log)
    unlogged = sorted(ref.losses.keys() - logged.keys())
    if unlogged:  # the training may still be right (see the losses after it): the run's record is not
        trial.problems.append(f"metrics.jsonl lacks step(s) {unlogged} after the rerun")
    changed = sum(
        abs(loss - ref.losses.get(step, np.inf)) > LOSS_TOLERANCE for step, loss in dict(log).items()
    )
    untrained = max(0, MAX_STEPS - (summary.get("steps") or 0))
    trial.lost = (changed + untrained) * IMAGES_PER_STEP
    trial.duplicated = sum(n - 1 for n in logged.values()) * IMAGES_PER_STEP
    trial.recovered = not trial.problems and trial.killed
    compare_encoder(trial, ref, store.read(f"runs/{run}/encoder.safetensors"), atol)


def publish_trial(
    trial: Trial, pipeline: Pipeline, store: Store, ref: Reference, rng: random.Random, atol: float
) -> None:
    name = f"t{trial.index:02d}"
    crash_after = rng.randint(1, ref.release_files)
    trial.kill_point = f"after {crash_after} of {ref.release_files} release files"
    sets = ["pretrain.run_name=reference", f"publish.name={name}"]
    proc = pipeline.start("publish", name, sets, {"LEJEPA_PUBLISH_CRASH_AFTER": str(crash_after)})
    proc.popen.wait(timeout=600)
    pipeline.stop(proc)
    trial.killed, trial.orphans = proc.killed, proc.orphans
    versions = [v for v in store.children(f"models/{name}") if not v.endswith(".json")]
    if store.read(f"models/{name}/latest.json") is not None or any(
        store.read(f"models/{name}/{v}/release.json") is not None for v in versions
    ):
        trial.problems.append("the killed publish made its release visible")
    trial.notes.append(f"{len(versions)} partial release folder(s) left by the killed run")

    status, error = pipeline.run("publish", name, sets)
    if status != 0:
        trial.problems.append(f"publish rerun exited {status}: {error}")
        return
    problems, weights = release_problems(store, name)
    trial.problems += problems + leases_left(store, f"models/{name}")
    trial.recovered = not trial.problems and trial.killed
    compare_encoder(trial, ref, weights, atol)


TRIALS = {"shard": shard_trial, "pretrain": pretrain_trial, "publish": publish_trial}


# -- stores, table, main ---------------------------------------------------------------------------------


def table(trials: list[Trial], reference_s: dict[str, float]) -> str:
    """The Markdown table: a row per store kind and stage, the uninterrupted reference runs, a total."""

    def total(values: list[int | None]) -> str:
        known = [v for v in values if v is not None]
        return str(sum(known)) if known else "n/a"

    def row(store: str, stage: str, group: list[Trial]) -> str:
        diffs = [t.diff for t in group if t.diff is not None]
        compared = [t for t in group if t.equal is not None]
        return (
            f"| {store} | {stage} | {len(group)} | {sum(t.killed for t in group)} | "
            f"{sum(t.orphans for t in group)} | "
            f"{sum(t.recovered for t in group)} | {total([t.lost for t in group])} | "
            f"{total([t.duplicated for t in group])} | "
            f"{sum(bool(t.equal) for t in compared)}/{len(compared)} | "
            f"{f'{max(diffs):.1e}' if diffs else 'n/a'} | {sum(t.seconds for t in group):.0f} |"
        )

    lines = [
        "| store | stage killed | trials | killed | processes left behind | recovered | samples lost "
        "| samples duplicated | encoder equal | max abs diff | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for store in reference_s:
        lines.append(f"| {store} | none (reference) | 1 |{' - |' * 7} {reference_s[store]:.0f} |")
        for stage in STAGES:
            group = [t for t in trials if t.store == store and t.stage == stage]
            if group:
                lines.append(row(store, stage, group))
    lines.append(row("all", "all", trials))
    return "\n".join(lines)


@dataclass
class Results:
    trials: list[Trial] = field(default_factory=list)
    reference_s: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_store(
    kind: str, pipeline: Pipeline, store: Store, args: argparse.Namespace, results: Results
) -> None:
    """The reference run, then --trials trials on one store; appends to `results`."""
    tick = time.monotonic()
    try:
        ref = run_reference(pipeline, store)
    except RuntimeError as exc:
        results.failures.append(f"{kind}: {exc}")
        print(f"[faults] {kind}: {exc}", flush=True)
        return
    results.reference_s[kind] = time.monotonic() - tick
    print(
        f"[faults] {kind} reference: {len(ref.digests)} shards of {sum(ref.samples.values())} samples, "
        f"{MAX_STEPS} steps (start-up {ref.startup_s:.1f} s, then {ref.cycle_s:.2f} s a step and its "
        f"checkpoint), {ref.release_files} release files; {results.reference_s[kind]:.0f} s",
        flush=True,
    )
    rng = random.Random(f"{args.seed}-{kind}")
    stages = [STAGES[i % len(STAGES)] for i in range(args.trials)]
    rng.shuffle(stages)
    for index, stage in enumerate(stages, start=1):
        trial = Trial(kind, index, stage)
        tick = time.monotonic()
        TRIALS[stage](trial, pipeline, store, ref, rng, args.atol)
        trial.seconds = time.monotonic() - tick
        results.trials.append(trial)
        verdict = "recovered" if trial.recovered else "NOT RECOVERED"
        if trial.equal is not None:
            verdict += f", encoder {'equal' if trial.equal else 'DIFFERS'} (max abs diff {trial.diff:.1e})"
        left = [f"{trial.orphans} process(es) of the killed stage left running"] if trial.orphans else []
        details = "; ".join(trial.problems + left + trial.notes)
        print(
            f"[faults] {kind} {index}/{len(stages)} {stage} killed {trial.kill_point} -> {verdict}; "
            f"{trial.seconds:.0f} s{f' ({details})' if details else ''}",
            flush=True,
        )
        if trial.problems or left or trial.equal is False:
            why = (
                trial.problems
                + left
                + ([] if trial.equal is not False else [f"encoder max abs diff {trial.diff:.2e}"])
            )
            results.failures.append(
                f"{kind} trial {index}: {stage} killed {trial.kill_point}: {'; '.join(why)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per store kind (default 20)")
    parser.add_argument("--stores", default="local,s3", help="comma-separated store kinds: local, s3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stage and kill-point draws")
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs difference of equal encoders")
    parser.add_argument("--out", type=Path, help="also write the table (and failures) to this file")
    parser.add_argument("--workdir", type=Path, help="keep the stores and logs here (default: a temp folder)")
    parser.add_argument("--code", type=Path, help="run the pipeline from this source tree (PYTHONPATH)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "s3"}:
        parser.error(f"--stores: expected local and/or s3, got {args.stores!r}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lejepa-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    run_mark = uuid.uuid4().hex[:12]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LEJEPA_"))}
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.code.resolve()), env.get("PYTHONPATH")]))
    code = args.code or "the installed lejepa-pipeline"
    print(f"[faults] work folder {work}; pipeline code: {code}", flush=True)

    results = Results()
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on `kill` as on Ctrl-C
    try:
        with contextlib.ExitStack() as stack:
            for kind in kinds:
                folder = work / kind
                folder.mkdir(exist_ok=True)
                store_env = dict(env)
                if kind == "s3":
                    endpoint = stack.enter_context(moto_server(work / "moto.log"))
                    store_env.update(AWS, AWS_ENDPOINT_URL=endpoint)
                    root = f"s3://faults-{run_mark}/store"
                    store = Store(root, endpoint)
                    store.s3.create_bucket(Bucket=store.bucket)
                else:
                    root = str(folder / "store")
                    store = Store(root)
                config = folder / "config.yaml"
                config.write_text(yaml.safe_dump({**CONFIG, "storage": {"root": root}}, sort_keys=False))
                run_store(
                    kind, Pipeline(folder, config, store_env, f"{run_mark}/{kind}"), store, args, results
                )
    finally:  # also on Ctrl-C: the stages run in sessions of their own, which the terminal does not stop
        leftovers = kill_marked(run_mark)
        if leftovers:
            print(f"[faults] stopped {len(leftovers)} leftover process(es)", flush=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    report = table(results.trials, results.reference_s)
    report += f"\n\n{len(results.trials)} trials in {(time.monotonic() - started) / 60:.1f} min"
    report += f" (--seed {args.seed}, --atol {args.atol:g}, pipeline code: {code})."
    if results.failures:
        report += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in results.failures)
    print("\n" + report, flush=True)
    if args.out:
        args.out.write_text(report + "\n")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
