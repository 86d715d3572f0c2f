"""No silent data mix-ups: every rank and stage reads the one manifest the run resolved, and a resume under
other settings than its checkpoint's is refused.

Two versions of the digits dataset share a store; `latest.json` points at the second one, while the run is
pinned to the first through `data.manifest`. The run is the tiny 2-rank CPU config of test_train.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from test_train import pretrain, write_config

from lejepa.config import load_config
from lejepa.data.manifest import ShardManifest, latest_manifest_url, locate_manifest
from lejepa.data.shard import write_shards
from lejepa.evaluate import stage as evaluate
from lejepa.store.storage import Storage
from lejepa.train.launch import LaunchFailed


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 2-rank run pinned to dataset A while latest.json names dataset B; its config and output."""
    root = tmp_path_factory.mktemp("store")
    shard = [f"storage.root={root}", "data.source=digits"]
    pinned = write_shards(load_config(None, [*shard, "data.val_fraction=0.1"]), progress=False).manifest
    newer = write_shards(load_config(None, [*shard, "data.val_fraction=0.3"]), progress=False).manifest
    config = write_config(
        root / "cfg.yaml",
        root,
        "pinned",
        data={"val_fraction": 0.2, "manifest": pinned},  # a version nobody sharded: it would find B
        pretrain={"max_steps": 2, "checkpoint_every": 2},
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = pretrain(config)
    return {"root": root, "config": config, "pinned": pinned, "newer": newer, "summary": summary, "log": out}


def test_pretrain_trains_on_data_manifest_and_records_it(run: dict) -> None:
    storage = Storage(str(run["root"]))
    assert latest_manifest_url(storage, "digits") == run["newer"] != run["pinned"]
    unpinned = load_config(run["config"], ["data.manifest=null"])
    assert locate_manifest(unpinned, storage) == run["newer"]  # what every rank found before

    summary, run_dir = run["summary"], Path(run["summary"]["run_dir"])
    assert summary["steps"] == 2 and summary["manifest"] == run["pinned"]
    assert json.loads((run_dir / "summary.json").read_text())["manifest"] == run["pinned"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["manifest"] == run["pinned"] and config["world_size"] == 2
    train_images = ShardManifest.load(storage, run["pinned"]).num_samples["train"]
    assert f"{train_images} training images of {run['pinned']}" in run["log"].getvalue()


def test_evaluate_scores_the_manifest_the_run_trained_on(run: dict, tmp_path: Path) -> None:
    # The run's config without data.manifest: on its own it would resolve latest.json (dataset B).
    cfg = load_config(
        run["config"],
        [
            "data.manifest=null",
            "evaluate.device=cpu",
            "evaluate.baselines=false",
            "evaluate.probe_epochs=2",
            "evaluate.num_workers=0",
            "evaluate.diagnostic_samples=64",
        ],
    )
    summary = evaluate.run_evaluate(cfg)
    metrics = json.loads(Path(summary.metrics).read_text())
    pinned = ShardManifest.load(Storage(str(run["root"])), run["pinned"])
    assert metrics["dataset"]["manifest"] == run["pinned"]
    assert metrics["dataset"]["version"] == pinned.version
    assert metrics["dataset"]["splits"]["test"] == {
        "split": "val",  # dataset A has no test split: its val split is scored
        "num_samples": pinned.num_samples["val"],
        "fingerprint": pinned.splits["val"].fingerprint,
    }


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "launch.nproc_per_node=1",
            "was checkpointed with 2 ranks, this launch has 1: resume it with the original "
            "launch.nproc_per_node",
        ),
        (
            "pretrain.num_workers=0",
            "was checkpointed with pretrain.num_workers=1, this launch has 0: resume it with the original "
            "pretrain.num_workers=1, or start a new run with another pretrain.run_name",
        ),
        (
            "model.proj_dim=32",
            "was checkpointed with model.proj_dim=64, this launch has 32: resume it with the original "
            "model.proj_dim=64, or start a new run with another pretrain.run_name",
        ),
    ],
)
def test_resume_under_other_settings_is_refused(run: dict, override: str, expected: str) -> None:
    run_dir = Path(run["summary"]["run_dir"])
    kept = {name: (run_dir / name).read_bytes() for name in ("config.json", "checkpoints/latest.json")}
    with pytest.raises(LaunchFailed) as failed:
        pretrain(run["config"], override, "pretrain.max_steps=4")
    # The launch fails with the rank's error line: the run, and what to resume it with.
    message = str(failed.value)
    assert re.fullmatch(rf"rank \d: run {re.escape(f'{run_dir} {expected}')}.* \(exit status 2\)", message), (
        message
    )
    # Nothing was trained or rewritten: the stored config still says what the checkpoint was trained with.
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
