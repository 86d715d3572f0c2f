"""Experiment tracking for real: a tiny run mirrored to an MLflow server, TensorBoard files and W&B offline.

One training run (digits, resnet10t, one rank, 4 steps), its evaluation and three publishes are shared by
the tests; what each tracker got is read back with the tracker's own reader: MlflowClient, TensorBoard's
EventAccumulator, and the records of W&B's offline run file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lejepa.config import ConfigError, PipelineConfig, load_config
from lejepa.data.shard import write_shards
from lejepa.evaluate.stage import run_evaluate
from lejepa.publish.stage import PublishSummary, run_publish
from lejepa.store.storage import Storage
from lejepa.tracking import CHAMPION, Tracker, flatten
from lejepa.train.launch import free_port
from lejepa.train.pretrain import run_pretrain

TINY = [
    "data.source=digits",
    "data.limit=600",
    "model.backbone=resnet10t",
    "model.proj_hidden_dim=128",
    "model.proj_dim=32",
    "views.local_views=2",
    "loss.num_slices=64",
    "pretrain.batch_size=32",
    "pretrain.max_steps=4",
    "pretrain.log_every=1",
    "pretrain.checkpoint_every=2",
    "pretrain.num_workers=0",
    "launch.nproc_per_node=1",
    "launch.accelerator=cpu",
    "evaluate.probe_epochs=2",
    "evaluate.num_workers=0",
    "evaluate.calibration_samples=256",
    "evaluate.diagnostic_samples=256",
    "publish.name=digits-encoder",
]
TRAIN_KEYS = {"train/loss", "train/prediction", "train/sigreg", "train/lr", "train/grad_norm"}
TRAIN_KEYS |= {"train/images_per_s", "train/data_wait", "train/probe_acc", "train/skipped_steps"}


@dataclass
class Tracked:
    cfg: PipelineConfig
    storage: Storage
    run_url: str
    client: MlflowClient
    run_id: str
    wandb_dir: Path
    releases: list[PublishSummary]


@pytest.fixture(scope="module")
def wandb_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """W&B offline writes its runs here (WANDB_DIR), not into the working directory."""
    folder = tmp_path_factory.mktemp("wandb")
    saved = os.environ.get("WANDB_DIR")
    os.environ["WANDB_DIR"] = str(folder)
    yield folder
    os.environ.pop("WANDB_DIR") if saved is None else os.environ.__setitem__("WANDB_DIR", saved)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_shards(load_config(None, [f"storage.root={root}", *TINY[:2]]), progress=False)
    return root


def tiny(store: Path, run_name: str, *extra: str) -> PipelineConfig:
    return load_config(None, [f"storage.root={store}", *TINY, f"pretrain.run_name={run_name}", *extra])


@pytest.fixture(scope="module")
def tracked(
    store: Path, mlflow_uri: str, wandb_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Tracked:
    """Train, evaluate, then publish three times: forced (promoted), gated (refused: below a min_top1 of
    1), forced again (promoted, the champion moves)."""
    trackers = [f"tracking.mlflow_uri={mlflow_uri}", "tracking.tensorboard=true"]
    trackers += ["tracking.wandb_project=lejepa-tests", "tracking.wandb_mode=offline"]
    cfg = tiny(store, "tracked", *trackers)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("work"))  # where the launcher keeps the ranks' config file
        run_pretrain(cfg)
    run_evaluate(cfg)
    gated = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"min_top1": 1.0})})
    releases = [run_publish(cfg, force=True), run_publish(gated), run_publish(cfg, force=True)]
    storage = Storage.from_config(cfg.storage)
    run_url = storage.url("runs", "tracked")
    run_id = storage.read_json(f"{run_url}/tracking.json")["mlflow"]["run_id"]
    return Tracked(cfg, storage, run_url, MlflowClient(mlflow_uri), run_id, wandb_dir, releases)


def history_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_run_sends_its_params_curves_scores_tags_and_reports_to_mlflow(tracked: Tracked) -> None:
    run = tracked.client.get_run(tracked.run_id)
    record = tracked.storage.read_json(f"{tracked.run_url}/config.json")
    # Rank 0's record (the config with its manifest and world size), then what evaluation adds (nothing new).
    assert run.data.params == {k: v[:6000] for k, v in flatten(record).items()}
    assert run.data.params["pretrain.max_steps"] == "4" and run.data.params["world_size"] == "1"
    assert set(run.data.metrics) >= TRAIN_KEYS
    for key in TRAIN_KEYS:
        assert history_steps(tracked.client, tracked.run_id, key) == [1, 2, 3, 4], key
    log = [json.loads(line) for line in Path(tracked.run_url, "metrics.jsonl").read_text().splitlines()]
    losses = {m.step: m.value for m in tracked.client.get_metric_history(tracked.run_id, "train/loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in log})
    metrics = json.loads(Path(tracked.run_url, "metrics.json").read_text())
    for model in ("encoder", "random_init", "raw_pixels"):
        top1 = tracked.client.get_metric_history(tracked.run_id, f"eval/{model}/linear_probe_top1")
        assert [(m.step, m.value) for m in top1] == [
            (4, pytest.approx(metrics["models"][model]["linear_probe_top1"]))
        ]
    manifest = metrics["dataset"]
    assert run.data.tags["dataset.manifest"] == manifest["manifest"]
    assert run.data.tags["dataset.version"] == manifest["version"]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    artifacts = {a.path for a in tracked.client.list_artifacts(tracked.run_id)}
    assert {"evaluation.png", "report.html", "README.md"} <= artifacts
    links = tracked.storage.read_json(f"{tracked.run_url}/tracking.json")["mlflow"]
    assert links["url"].endswith(f"/#/experiments/{run.info.experiment_id}/runs/{tracked.run_id}")
    assert (
        tracked.client.get_experiment(run.info.experiment_id).name == "digits"
    )  # data.name, else the source


def test_tensorboard_and_wandb_get_the_same_curves(tracked: Tracked) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(tracked.run_url, "tensorboard"))).Reload()
    assert set(events.Tags()["scalars"]) >= TRAIN_KEYS | {"eval/encoder/linear_probe_top1"}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/raw_pixels/linear_probe_top1")] == [4]
    assert events.Tags()["images"] == ["evaluation.png"]

    wandb_id = tracked.storage.read_json(f"{tracked.run_url}/tracking.json")["wandb"]["id"]
    runs = sorted(tracked.wandb_dir.glob(f"wandb/offline-run-*-{wandb_id}"))
    assert len(runs) == 5  # one session per stage: pretrain, evaluate, three publishes
    history = [r for run in runs for r in wandb_records(run / f"run-{wandb_id}.wandb") if r[0] == "history"]
    steps = [step for _, step, items in history if "train/loss" in items]
    assert steps == [1, 2, 3, 4]
    assert any("eval/encoder/linear_probe_top1" in items for _, _, items in history)
    saved = {path.name for run in runs for path in (run / "files").iterdir()}
    assert {"evaluation.png", "report.html", "README.md"} <= saved


def test_publish_registers_promoted_releases_and_moves_the_champion(tracked: Tracked) -> None:
    first, refused, second = tracked.releases
    assert (first.promoted, refused.promoted, second.promoted) == (True, False, True)
    name = tracked.cfg.publish.name
    versions = tracked.client.search_model_versions(f"name='{name}'")
    assert sorted(v.tags["release.version"] for v in versions) == sorted([first.version, second.version])
    champion = tracked.client.get_model_version_by_alias(name, CHAMPION)
    assert champion.tags["release.version"] == second.version
    assert champion.tags["release.url"] == second.model_uri and champion.run_id == tracked.run_id
    assert float(champion.tags["linear_probe_top1"]) >= 0
    tags = tracked.client.get_run(tracked.run_id).data.tags
    assert tags["release.refused"] == refused.version and tags["release.refused.reason"] == refused.reason
    assert "below publish.min_top1" in refused.reason
    kept = {a.path for a in tracked.client.list_artifacts(tracked.run_id, f"releases/{second.version}")}
    assert {p.rsplit("/", 1)[-1] for p in kept} == {"README.md", "encoder.json", "release.json"}


def test_a_resumed_run_continues_the_same_mlflow_run_without_repeating_a_step(
    tracked: Tracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tracked.cfg.model_copy(deep=True)
    cfg.pretrain.max_steps = 6  # the same run, two more steps: it resumes from its step-4 checkpoint
    run_pretrain(cfg)
    assert "resuming at step 4" in capsys.readouterr().out
    record = tracked.storage.read_json(f"{tracked.run_url}/tracking.json")
    assert record["mlflow"]["run_id"] == tracked.run_id
    assert history_steps(tracked.client, tracked.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    experiment = tracked.client.get_run(tracked.run_id).info.experiment_id
    assert len(tracked.client.search_runs([experiment], "attributes.run_name = 'tracked'")) == 1
    # A tracker reopened on the run sends only the steps the run does not have yet.
    with Tracker.for_run(cfg, tracked.storage, tracked.run_url) as tracker:
        for step in (5, 6, 7):
            tracker.log_metrics(step, {"train/loss": 0.5})
    assert history_steps(tracked.client, tracked.run_id, "train/loss") == [1, 2, 3, 4, 5, 6, 7]


def test_a_tracker_that_is_down_costs_one_warning_and_training_completes(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tiny(
        store, "unreachable", f"tracking.mlflow_uri=http://127.0.0.1:{free_port()}", "pretrain.max_steps=2"
    )
    summary = run_pretrain(cfg)
    out = capsys.readouterr().out
    assert summary["steps"] == 2
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert (
        len(warnings) == 1 and "mlflow at http://127.0.0.1:" in warnings[0] and "unreachable" in warnings[0]
    )
    # Opening the run, its params, its tags, two points, the checkpoint's sync and the close: all counted.
    assert "[tracking] 7 updates could not be sent to mlflow at http://127.0.0.1:" in out
    assert not Path(store, "runs", "unreachable", "tracking.json").exists()


def test_an_mlflow_uri_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError, match="tracking.mlflow_uri: .*MLFLOW_TRACKING_USERNAME") as refused:
        load_config(None, ["tracking.mlflow_uri=https://me:s3cret@mlflow.example.com"])
    assert "s3cret" not in str(refused.value)


def wandb_records(path: Path) -> list[tuple[str, int, set[str]]]:
    """(record type, history step, history keys) of each record of a W&B run file: LevelDB's log format
    (32 KiB blocks of chunks with a 7-byte header) after a 7-byte W&B header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    found, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            items = {i.key or "/".join(i.nested_key) for i in record.history.item}
            found.append((record.WhichOneof("record_type"), record.history.step.num, items))
    return found
