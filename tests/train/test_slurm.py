"""The Slurm launch on a real two-node Slurm cluster (slurmctld and two slurmd on this machine, started once
for the suite by the `slurm` fixture): training through the Prefect flow, requeues, a failing
rank, cancellation, and one writer per run.

Every run trains LeJEPA for real (a tiny ResNet on the 8x8 digits, fp32, one rank per node, one thread per
rank) and is compared with the same config run as two local ranks on this machine: same data order, so
the encoders must match within 1e-5. Slurm holds a requeued job for ~20 s here (`cred_expire`; 120 s on a
default cluster) before it runs again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
from prefect.logging.handlers import APILogWorker
from safetensors.torch import load_file

from lejepa.config import PipelineConfig, load_config
from lejepa.data.manifest import ShardManifest, locate_manifest
from lejepa.data.shard import write_shards
from lejepa.data.stream import TrainStream, _slice
from lejepa.store.storage import Storage
from lejepa.train.launch import slurm_job_listed
from lejepa.train.pretrain import run_pretrain

STEPS = 60
TINY = [
    "data.source=digits",
    "shard.samples_per_shard=400",
    "model.backbone=resnet10t",
    "model.proj_hidden_dim=128",
    "model.proj_dim=32",
    "views.local_views=2",
    "loss.num_slices=64",
    "pretrain.batch_size=32",
    f"pretrain.max_steps={STEPS}",
    "pretrain.checkpoint_every=5",
    "pretrain.log_every=5",
    "pretrain.num_workers=0",
    "pretrain.precision=fp32",
    "launch.accelerator=cpu",
]
TWO_NODES = ["launch.mode=slurm", "launch.nnodes=2", "launch.nproc_per_node=1", "launch.cpus_per_task=1"]
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The encoder of an uninterrupted two-rank run on this machine (launch.mode=local)."""
    root = sharded(tmp_path_factory.mktemp("reference"))
    summary = run_pretrain(config(root, "launch.mode=local", "launch.nproc_per_node=2"))
    return encoder_of(summary["run_dir"])


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the job's script and log go to ./slurm, the ranks' config beside it
    return sharded(tmp_path / "store")


def sharded(root: Path) -> Path:
    """A store holding the digits, sharded."""
    write_shards(config(root), progress=False)
    return root


def config(root: Path, *extra: str) -> PipelineConfig:
    return load_config(None, [f"storage.root={root}", *TINY, *extra])


def encoder_of(run_dir: str | Path) -> dict:
    return load_file(str(Path(run_dir) / "encoder.safetensors"))


def assert_same_encoder(run_dir: str | Path, reference: dict) -> None:
    encoder = encoder_of(run_dir)
    assert encoder.keys() == reference.keys()
    worst = max(float((encoder[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= 1e-5, f"encoder differs from the uninterrupted local run by {worst}"
    print(f"encoder vs the uninterrupted local run: max abs difference {worst:.3g}")


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.exists() else 0


def wait_for(predicate, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def job_of(run: Path) -> str:
    """The Slurm job id that the run's lease records."""
    lease = run / "lease.json"
    wait_for(lambda: lease.exists() and "job" in json.loads(lease.read_text() or "{}"), "the lease's job")
    return json.loads(lease.read_text())["job"]["id"]


def task_log(flow_state, name: str) -> list[tuple[float, str]]:
    """Every log line of the flow run's task run `name-...`, with the time it was logged."""
    from test_flows import task_runs_of

    (run,) = [r for r in task_runs_of(flow_state.state_details.flow_run_id) if r.name.startswith(name)]
    APILogWorker.drain_all(timeout=60)  # the run's last lines may still be on their way to the API
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])))
    return [(log.timestamp.timestamp(), line) for log in logs for line in log.message.splitlines()]


def pretrain_cli(root: Path, *extra: str) -> subprocess.Popen:
    """`lejepa-pipeline pretrain` as a user starts it from a terminal, in its own process.

    With Ctrl-C's SIGINT at its default disposition: a shell without job control starts background jobs
    (a CI script's `make test &`, say) with SIGINT ignored, which children inherit, and Python then installs
    no KeyboardInterrupt handler."""
    args = [f"--set={item}" for item in [f"storage.root={root}", *TINY, *TWO_NODES, *extra]]
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "pretrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def collect(proc: subprocess.Popen) -> list[str]:
    """The process's output lines, read in the background, so its pipe never fills."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
    return lines


# --- through the Prefect flow ----------------------------------------------------------------------------


def test_two_node_job_trains_as_a_local_two_rank_run_and_resumes_after_a_requeue(
    slurm: dict[str, str], prefect_api: None, store: Path, reference: dict
) -> None:
    from flows.pipeline import pretrain_flow

    run = store / "runs" / "default"
    requeued: dict[str, float] = {}

    def requeue_after_a_checkpoint() -> None:
        job = job_of(run)
        wait_for(lambda: latest_step(run) >= 5, "the first checkpoint")
        subprocess.run(["scontrol", "requeue", job], check=True, env={**os.environ, **slurm})
        requeued["at"] = time.time()

    thread = threading.Thread(target=requeue_after_a_checkpoint, daemon=True)
    thread.start()
    state = pretrain_flow(config=config(store, *TWO_NODES), return_state=True)
    thread.join(timeout=1)
    assert state.is_completed(), state.message
    assert state.result()["steps"] == STEPS
    assert_same_encoder(state.result()["run_dir"], reference)

    timed = task_log(state, "pretrain-")
    log = [line for _, line in timed]
    job = re.search(r"submitted Slurm job (\d+)", "\n".join(log)).group(1)
    notes = [line for line in log if line.startswith(f"job {job} requeued")]
    assert len(notes) == 1 and re.fullmatch(
        rf"job {job} requeued \(job requeue\): resuming at step \d+", notes[0]
    )
    resumed_at = int(notes[0].rsplit(" ", 1)[1])
    noted = next(when for when, line in timed if line == notes[0])
    print(f"scontrol requeue to 'resuming at step {resumed_at}': {noted - requeued['at']:.1f} s")
    assert 5 <= resumed_at < STEPS
    # Each line of the job's log reached the task's log once, across the requeue: one line per logged step.
    steps = [int(m.group(1)) for line in log if (m := re.search(r"\[pretrain\] step (\d+)/", line))]
    assert steps == list(range(5, STEPS + 1, 5)), steps
    # A CPU job's ranks say nothing of CUDA or of DeepSpeed loading its CPU collectives.
    assert not [line for line in log if "No CUDA runtime" in line or "built successfully" in line]
    metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert metrics == list(range(1, STEPS + 1))
    assert not (run / "lease.json").exists()


def test_a_rank_failing_on_node2_fails_the_task_with_one_line_naming_node_and_rank(
    slurm: dict[str, str], prefect_api: None, store: Path
) -> None:
    from flows.pipeline import pretrain_flow

    cfg = config(store, *TWO_NODES, "orchestration.pretrain.retries=0")
    # A byte appended to a shard that only rank 1 (node2) reads in the first epoch: its sha256 check fails.
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, locate_manifest(cfg, storage))
    stream = TrainStream(manifest, storage, split="train", batch_size=32, rank=1, world_size=2, seed=cfg.seed)
    order, span = stream.shard_order(0), stream.steps_per_epoch * 32
    whole = [r.shard for r in _slice(order, span, 2 * span) if r.start == 0 and r.stop == r.shard.num_samples]
    rank1_only = [s for s in whole if s.url not in {r.shard.url for r in _slice(order, 0, span)}]
    with open(rank1_only[0].url, "ab") as f:
        f.write(b"\0")

    state = pretrain_flow(config=cfg, return_state=True)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert re.fullmatch(
        rf"rank 1 on node2: {re.escape(rank1_only[0].url)} does not match its sha256 .* \(exit status 2\)",
        error,
    ), error


# --- through the command line: time limits, cancellation, a killed launcher ------------------------------


def test_a_job_near_its_time_limit_requeues_itself_and_finishes(
    slurm: dict[str, str], store: Path, reference: dict
) -> None:
    run = store / "runs" / "default"
    proc = pretrain_cli(store, "launch.requeue_on_timeout=true", 'launch.time="10"')
    lines = collect(proc)
    job = job_of(run)
    wait_for(lambda: latest_step(run) >= 5, "the first checkpoint")
    # What Slurm does launch.timeout_signal_s before the time limit: USR1 to the job's batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert proc.wait(timeout=300) == 0, "".join(lines[-40:])
    out = "".join(lines)
    assert re.search(rf"^job {job} requeued \(time limit\): resuming at step \d+$", out, re.MULTILINE), out
    assert_same_encoder(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_launcher_cancels_its_job_and_returns_once_squeue_no_longer_lists_it(
    slurm: dict[str, str], store: Path, sig: signal.Signals
) -> None:
    run = store / "runs" / "default"
    proc = pretrain_cli(store, "pretrain.max_steps=400")  # the job must outlive the signal, however slow
    lines = collect(proc)
    job = job_of(run)
    wait_for(lambda: latest_step(run) >= 5, "the first checkpoint")
    sent = time.monotonic()
    proc.send_signal(sig)
    status = proc.wait(timeout=120)
    took = time.monotonic() - sent
    assert not slurm_job_listed(job), "the launcher returned while squeue still listed its job"
    out = "".join(lines)
    assert status == (143 if sig == signal.SIGTERM else 130), out[-3000:]
    assert f"launch: Slurm job {job} cancelled" in out
    # The ranks committed the step they stopped at, so nothing trained is lost; the lease is released.
    stopped = re.search(r"\[pretrain\] stopped at step (\d+) on SIGTERM", out)
    assert stopped and latest_step(run) == int(stopped.group(1)), out[-3000:]
    assert not (run / "lease.json").exists()
    print(f"{sig.name} to the launcher's return, squeue empty: {took:.1f} s")


def test_a_killed_launcher_leaves_no_second_writer_and_the_retry_resumes_alone(
    slurm: dict[str, str], store: Path
) -> None:
    run = store / "runs" / "default"
    longer = "pretrain.max_steps=400"  # the job must outlive the second attempt
    first = pretrain_cli(store, longer)
    collect(first)
    job = job_of(run)
    wait_for(lambda: latest_step(run) >= 5, "the first checkpoint")
    first.kill()
    first.wait()
    assert slurm_job_listed(job), "the job should train on without its launcher"

    second = pretrain_cli(store, longer)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: {run} is being trained by Slurm job {job} (scancel {job}), which the launcher (pid "
        f"{first.pid} on {socket.gethostname()}) left running: wait for the job to end, or cancel it, then "
        "run again to resume"
    )
    assert slurm_job_listed(job)  # the refusal left the job alone

    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not slurm_job_listed(job), "the cancelled job to leave squeue", timeout=60)
    committed = latest_step(run)
    third = pretrain_cli(store, longer)
    lines = collect(third)
    wait_for(lambda: any("resuming at step" in line for line in lines), "the retry to resume")
    assert f"resuming at step {committed}," in "".join(lines)
    retry_job = job_of(run)
    assert retry_job != job and not slurm_job_listed(job)  # it trains alone
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=120) == 143
