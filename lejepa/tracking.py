"""Experiment tracking: the run mirrored to MLflow, TensorBoard and W&B (the `tracking` config section).

The stages call one small interface, `Tracker`: `log_params`, `log_metrics(step, values)`, `log_artifact`,
`set_tags`, `record_release`, `sync` and `close`, fanned out to every backend that is on. What each sees:

- the config (redacted: no credential ever) as parameters, flattened to dotted keys;
- from training's rank 0, at every flush of statistics (every `pretrain.log_every` steps, and at each
  checkpoint and the end): `train/loss`, its two terms, lr, gradient norm, images/s, data wait, the online
  probe and the steps skipped since the previous point, at their step numbers;
- evaluation's scores of the encoder and of both baselines (`eval/{model}/{score}`), the figure,
  `report.html` and the model card as artifacts, the dataset manifest's URL and version as tags;
- each release: MLflow registers a promoted one under `publish.name` and moves the alias `champion` to it;
  a refused one is only recorded on the run (its version and reason as tags).

Each backend's calls run in order on a thread of its own, so a slow or dead tracker never stalls a step.
A tracker that is down gets one `warning:` line; what it could not take waits in a bounded queue and goes
when it is back, and what is still waiting when the stage ends is counted as lost, in one more line.

The runs' ids are kept in the run folder (`tracking.json`), so a resumed run, and the evaluate and
publish stages, continue the same tracker run; a resumed run sends no step its tracker run already has.
Trackers are imported only when on: none is a dependency of the pipeline (`pip install '.[tracking]'`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lejepa.config import PipelineConfig
from lejepa.data.manifest import dataset_name
from lejepa.store import layout
from lejepa.store.storage import Storage

QUEUE_LIMIT = 10_000
"""Calls a backend may have waiting (while it is down); further ones are dropped and counted as lost."""
RETRY_S = 5.0
"""Seconds between tries of a backend that is down."""
CLOSE_TIMEOUT_S = 30.0
"""How long `close` waits for a backend to take what is still queued."""
MLFLOW_TIMEOUTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
"""MLflow's defaults (120 s, 7 retries with back-off) would hold the queue for minutes; ours retries."""
CHAMPION = "champion"
"""The MLflow model alias that follows the promoted release."""
PARAM_BATCH, PARAM_VALUE_LIMIT = 100, 6000  # MLflow's limits per log_batch and per parameter value


@dataclass
class Release:
    """What publishing tells the trackers about one release."""

    name: str
    version: str
    url: str
    promoted: bool
    reason: str
    metrics: dict[str, float]
    files: dict[str, str]
    """File name -> URL of the release files the registry keeps (the model card, encoder.json, release.json);
    the weights stay in the store, which the release URL names."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"pretrain": {"lr": 0.002}} -> {"pretrain.lr": "0.002"}: a config as tracker parameters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


TRAINING_KEYS = {
    "loss": "train/loss",
    "prediction": "train/prediction",
    "sigreg": "train/sigreg",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "images_per_s": "train/images_per_s",
    "data_wait": "train/data_wait",
    "probe_loss": "train/probe_loss",
    "probe_acc": "train/probe_acc",
}


def training_point(record: dict[str, Any], skipped: int) -> dict[str, float]:
    """The tracker metrics of one metrics.jsonl record, with the steps `skipped` since the previous point."""
    values = {name: float(record[key]) for key, name in TRAINING_KEYS.items() if key in record}
    return {**values, "train/skipped_steps": float(skipped)}


def evaluation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval/{model}/{score}` for the encoder and each baseline of an evaluate stage's metrics.json."""
    return {
        f"eval/{model}/{key}": float(value)
        for model, scores in metrics.get("models", {}).items()
        for key, value in scores.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def dataset_tags(manifest_url: str, name: str, version: str) -> dict[str, str]:
    return {"dataset.manifest": manifest_url, "dataset.name": name, "dataset.version": version}


def tracker_links(storage: Storage, run_url: str) -> dict[str, str]:
    """{backend: URL of the run in its UI} as the run's tracking.json records them ({} when none)."""
    url = f"{run_url}/{layout.TRACKER}"
    record = storage.read_json(url) if storage.exists(url) else {}
    return {name: entry["url"] for name, entry in record.items() if entry.get("url")}


class TrackerRecord:
    """The run's `tracking.json`: {backend: {its run id, ...}}, read once and rewritten on each change."""

    def __init__(self, storage: Storage, run_url: str) -> None:
        self.storage, self.url = storage, f"{run_url}/{layout.TRACKER}"
        self.entries: dict[str, dict[str, Any]] = (
            storage.read_json(self.url) if storage.exists(self.url) else {}
        )
        self._lock = threading.Lock()

    def remember(self, backend: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.entries[backend] = entry
            self.storage.write_json(self.url, self.entries)


# -- the queue in front of each backend ----------------------------------------------------------------


class Sender:
    """One backend's calls, made in order on a daemon thread. A call that fails with an error the backend
    calls transient (unreachable, 5xx) is tried again every RETRY_S seconds, the calls behind it waiting;
    one that is refused (a 4xx) is dropped. The first call opens the backend's run: if that is refused,
    nothing more is sent to it. Each way of failing gets one `warning:` line; the count of what was lost
    comes at `close`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.queue: deque[Callable[[], None]] = deque()
        self.lost = self.refused = 0
        self.down = self.dead = self.closing = False
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tracker-{backend.name}", daemon=True)
        self.submit(backend.open)
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        with self._cond:
            if self.dead or len(self.queue) >= QUEUE_LIMIT:
                self.lost += 1
                return
            self.queue.append(call)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.queue and not self.closing:
                    self._cond.wait()
                if not self.queue:
                    return
                call = self.queue[0]
            try:
                call()
            except Exception as exc:
                if self.backend.transient(exc):
                    self._went_down(exc)
                    if self.closing:
                        return  # tried once more at the end: what is left is lost
                    self._wake.wait(RETRY_S)
                    continue
                self._was_refused(exc, opening=call == self.backend.open)
            else:
                if self.down:
                    self.down = False
                    print(
                        f"[tracking] {self._who()} is back: sending {len(self.queue) - 1} queued", flush=True
                    )
            with self._cond:
                self.queue.popleft()

    def _who(self) -> str:
        return f"{self.backend.name} at {self.backend.where}"

    def _went_down(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            print(
                f"warning: tracking: {self._who()} is unreachable ({_brief(exc)}): the run goes on; "
                f"up to {QUEUE_LIMIT} updates wait for it and are retried every {RETRY_S:g} s",
                flush=True,
            )

    def _was_refused(self, exc: Exception, opening: bool) -> None:
        if opening:
            with self._cond:
                self.dead = True
                self.lost += len(self.queue) - 1
                self.queue = deque([self.queue[0]])
            print(
                f"warning: tracking: {self._who()} refused the run ({_brief(exc)}): nothing goes to it",
                flush=True,
            )
        elif not self.refused:
            print(
                f"warning: tracking: {self._who()} refused an update ({_brief(exc)}): it is skipped",
                flush=True,
            )
        self.refused += 0 if opening else 1

    def close(self, timeout: float) -> None:
        """Send what is queued, within `timeout` seconds; then say what was lost, if anything."""
        with self._cond:
            self.closing = True
            self._cond.notify()
        self._wake.set()
        self._thread.join(timeout)
        with self._cond:
            unsent = self.lost + len(self.queue)
        if unsent or self.refused:
            print(
                f"[tracking] {unsent} updates could not be sent to {self._who()} and are lost"
                + (f"; it refused {self.refused} more" if self.refused else ""),
                flush=True,
            )


def _brief(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# -- the backends ----------------------------------------------------------------------------------------


class Backend:
    """One tracker. Every method runs on the backend's Sender thread, `open` first; all are optional."""

    name = "backend"
    where = ""

    def open(self) -> None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, local: Path, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def record_release(self, release: Release, local: dict[str, Path]) -> None: ...
    def sync(self) -> None: ...
    def close(self, failed: bool) -> None: ...

    def transient(self, exc: Exception) -> bool:
        """Whether `exc` says the tracker is out of reach (retry) rather than refusing the call (skip it)."""
        return isinstance(exc, (OSError, TimeoutError))


class MLflowBackend(Backend):
    """An MLflow run in experiment `experiment`, through MlflowClient (no global active run)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_url: str, record: TrackerRecord) -> None:
        self.uri = self.where = uri
        self.experiment, self.run_name, self.run_url, self.record = experiment, run_name, run_url, record
        self.run_id = ""
        self.artifact_uri = ""
        self.logged: dict[str, int] = {}
        """Metric -> the last step the run already has: a resumed run sends nothing at or before it."""
        self.params: dict[str, str] = {}

    def open(self) -> None:
        for name, value in MLFLOW_TIMEOUTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=self.uri)
        known = self.record.entries.get(self.name, {})
        run = self._known_run(known["run_id"]) if known.get("uri") == self.uri else None
        if run is None:
            run = client.create_run(
                self._experiment_id(), run_name=self.run_name, tags={"lejepa.run": self.run_url}
            )
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            self.params = dict(run.data.params)
            self.logged = {
                key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics
            }
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        url = f"{self.uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}"
        self.record.remember(
            self.name,
            {
                "uri": self.uri,
                "experiment_id": run.info.experiment_id,
                "run_id": self.run_id,
                "url": url if self.uri.startswith(("http://", "https://")) else None,
            },
        )

    def _known_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.get_http_status_code() == 404:
                return None  # deleted, or the server's store was reset: start a new run
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # another run created it meanwhile
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # Parameters are immutable in MLflow: a continued run sends only the new ones (the first value
        # stays; config.json in the run folder has every stage's own).
        new = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in params.items() if k not in self.params]
        for start in range(0, len(new), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + PARAM_BATCH])
        self.params.update({p.key: p.value for p in new})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if points:
            self.client.log_batch(self.run_id, metrics=points)
            self.logged.update({m.key: step for m in points})

    def log_artifact(self, local: Path, name: str) -> None:
        self.client.log_artifact(self.run_id, str(local))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def record_release(self, release: Release, local: dict[str, Path]) -> None:
        from mlflow.exceptions import MlflowException

        folder = f"releases/{release.version}"
        for path in local.values():
            self.client.log_artifact(self.run_id, str(path), folder)
        if not release.promoted:
            self.set_tags({"release.refused": release.version, "release.refused.reason": release.reason})
            return
        try:
            self.client.create_registered_model(release.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The server takes a version whose source lies in the run's own artifacts, not a store URL.
        version = self.client.create_model_version(
            release.name,
            f"{self.artifact_uri}/{folder}",
            run_id=self.run_id,
            tags={"release.version": release.version, "release.url": release.url}
            | {k: str(v) for k, v in release.metrics.items()},
            description=release.reason,
        )
        self.client.set_registered_model_alias(release.name, CHAMPION, version.version)
        self.set_tags({"release.version": release.version, "release.url": release.url})

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def transient(self, exc: Exception) -> bool:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):  # connection errors come as 500 INTERNAL_ERROR
            status = exc.get_http_status_code()
            return status >= 500 or status == 429
        return super().transient(exc)


class TensorBoardBackend(Backend):
    """Event files in `{run}/tensorboard/`: written locally (on a local store, in place) and copied to the
    store at every sync (a checkpoint's commit) and at the end."""

    name = "tensorboard"

    def __init__(self, storage: Storage, run_url: str, first_step: int | None) -> None:
        self.storage, self.url = storage, f"{run_url}/{layout.TENSORBOARD}"
        self.where = self.url
        self.local = storage.local_dir(self.url)
        # A resumed run takes over from its checkpoint: TensorBoard hides the older files' later steps.
        self.purge_step = None if first_step is None else first_step + 1
        self.copied: dict[Path, tuple[int, int]] = {}

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.local), purge_step=self.purge_step)

    def log_params(self, params: dict[str, str]) -> None:
        self.writer.add_text("config", _markdown_table(params))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, local: Path, name: str) -> None:
        if local.suffix == ".png":
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(local).convert("RGB"))
            self.writer.add_image(name, image, dataformats="HWC")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", _markdown_table(tags))

    def record_release(self, release: Release, local: dict[str, Path]) -> None:
        outcome = "promoted" if release.promoted else "refused"
        self.writer.add_text("release", f"{release.name} {release.version} {outcome}: {release.reason}")

    def sync(self) -> None:
        self.writer.flush()
        if self.storage.protocol == "file":
            return
        for path in sorted(self.local.rglob("*")):
            stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
            if stamp and self.copied.get(path) != stamp:
                self.storage.put_file(path, f"{self.url}/{path.relative_to(self.local).as_posix()}")
                self.copied[path] = stamp

    def close(self, failed: bool) -> None:
        self.writer.close()
        self.sync()


def _markdown_table(values: dict[str, str]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in values.items())


class WandbBackend(Backend):
    """A W&B run, online or offline (then under WANDB_DIR, for `wandb sync`)."""

    name = "wandb"

    def __init__(self, project: str, mode: str, group: str, run_name: str, record: TrackerRecord) -> None:
        self.project, self.mode, self.group, self.run_name = project, mode, group, run_name
        self.where = f"project {project} ({mode})"
        self.record = record
        known = record.entries.get(self.name, {})
        self.id = known.get("id") if known.get("project") == project else None

    def open(self) -> None:
        import wandb

        if self.id is None:
            self.id = uuid.uuid4().hex[:12]
            self.record.remember(self.name, {"project": self.project, "id": self.id, "url": None})
        settings = wandb.Settings(
            # No host facts, no command line (a user's --set may hold a credential), no console capture.
            x_disable_meta=True,
            x_disable_stats=True,
            disable_git=True,
            disable_code=True,
            console="off",
            silent=True,
        )
        self.run = wandb.init(
            project=self.project,
            id=self.id,
            resume="allow",
            mode=self.mode,
            name=self.run_name,
            group=self.group,
            settings=settings,
            reinit="create_new",
        )
        if self.mode == "online":
            self.record.remember(self.name, {"project": self.project, "id": self.id, "url": self.run.url})

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)  # W&B itself drops a step below one it has

    def log_artifact(self, local: Path, name: str) -> None:
        kept = Path(self.run.dir) / name
        shutil.copyfile(local, kept)
        self.run.save(str(kept), base_path=self.run.dir, policy="now")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.config.update({f"tag.{k}": v for k, v in tags.items()}, allow_val_change=True)

    def record_release(self, release: Release, local: dict[str, Path]) -> None:
        outcome = {"version": release.version, "url": release.url, "promoted": release.promoted}
        self.run.summary.update({f"release.{k}": v for k, v in {**outcome, "reason": release.reason}.items()})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def transient(self, exc: Exception) -> bool:
        return type(exc).__name__ in ("CommError", "CommTimeoutError") or super().transient(exc)


# -- what the stages call ----------------------------------------------------------------------------------


class Tracker:
    """The trackers `cfg.tracking` turns on, for one run; with none on, every method does nothing.

    Every method returns at once: the backends' own threads send. Use it as a context manager (or call
    `close`), so what is queued is sent and the tracker runs are marked finished, or failed.
    """

    def __init__(self, backends: list[Backend], storage: Storage | None = None) -> None:
        self.storage = storage
        self.senders = [Sender(backend) for backend in backends]
        self._staging: Path | None = None

    @classmethod
    def off(cls) -> Tracker:
        return cls([])

    @classmethod
    def for_run(
        cls, cfg: PipelineConfig, storage: Storage, run_url: str, first_step: int | None = None
    ) -> Tracker:
        """The trackers of run `run_url`: its tracker runs continued when tracking.json names them, else new
        ones. `first_step`: the step a training run starts from (its checkpoint's); steps up to it are not
        sent again."""
        t = cfg.tracking
        if not (t.mlflow_uri or t.tensorboard or t.wandb_project):
            return cls.off()
        record = TrackerRecord(storage, run_url)
        experiment, run_name = t.experiment or dataset_name(cfg.data), cfg.pretrain.run_name
        backends: list[Backend] = []
        if t.mlflow_uri:
            backends.append(MLflowBackend(t.mlflow_uri, experiment, run_name, run_url, record))
        if t.tensorboard:
            backends.append(TensorBoardBackend(storage, run_url, first_step))
        if t.wandb_project:
            backends.append(WandbBackend(t.wandb_project, t.wandb_mode, experiment, run_name, record))
        return cls(backends, storage)

    @property
    def enabled(self) -> bool:
        return bool(self.senders)

    def _each(self, call: Callable[[Backend], None]) -> None:
        for sender in self.senders:
            sender.submit(lambda backend=sender.backend: call(backend))

    def log_params(self, config: dict[str, Any]) -> None:
        """A config tree (already redacted: see lejepa.config.redacted) as flat parameters."""
        params = flatten(config)
        self._each(lambda b: b.log_params(params))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self._each(lambda b: b.log_metrics(step, values))

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = dict(tags)
        self._each(lambda b: b.set_tags(tags))

    def log_artifact(self, url: str) -> None:
        """The file at `url` (in the store) as it is now: copied aside at once, sent later."""
        if self.enabled:
            local = self._stage(url)
            self._each(lambda b: b.log_artifact(local, local.name))

    def record_release(self, release: Release) -> None:
        if self.enabled:
            local = {name: self._stage(url) for name, url in release.files.items()}
            self._each(lambda b: b.record_release(release, local))

    def sync(self) -> None:
        """A commit point: TensorBoard copies its event files to the store."""
        self._each(lambda b: b.sync())

    def close(self, failed: bool = False) -> None:
        self._each(lambda b: b.close(failed))
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for sender in self.senders:
            sender.close(max(0.0, deadline - time.monotonic()))
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(failed=exc_type is not None)

    def _stage(self, url: str) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="lejepa-tracking-"))
        folder = self._staging / uuid.uuid4().hex[:8]
        folder.mkdir()
        local = folder / url.rstrip("/").rsplit("/", 1)[-1]
        assert self.storage is not None
        self.storage.get_file(url, local)
        return local
