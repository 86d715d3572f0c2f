"""The publish stage: releases load back exactly, the gate keeps the better model, a crash exposes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lejepa.config import PipelineConfig, load_config
from lejepa.objective.model import create_backbone
from lejepa.publish.stage import CRASH_AFTER_ENV, cli, read_latest, run_publish, verify_release
from lejepa.store.errors import DataError
from lejepa.store.layout import LEASE, RELEASE
from lejepa.store.lease import Lease
from lejepa.store.storage import Storage
from lejepa.train.export import encoder_description, export_encoder, load_encoder

SECRET = "do-not-leak-this-secret"


def _evaluated_run(
    tmp_path: Path,
    top1: float | None,
    seed: int,
    run: str = "tiny",
    root: str | None = None,
    test_set: str = "test-set-1",
    raw_pixels: float = 0.5,
    *overrides: str,
) -> PipelineConfig:
    """An exported resnet10t (untrained, `seed`) and a metrics.json claiming linear-probe `top1`, measured
    on the test split with fingerprint `test_set`."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "root": root or str(tmp_path / "store"),
                    "access_key_id": "testing",
                    "secret_access_key": SECRET,
                },
                "pretrain": {"run_name": run},
                "publish": {"name": "fmnist", "min_top1": 0.5},
            }
        )
    )
    cfg = load_config(config, list(overrides))
    storage = Storage.from_config(cfg.storage)
    run_url = storage.url("runs", run)
    torch.manual_seed(seed)
    backbone = create_backbone("resnet10t", in_chans=1)
    description = encoder_description("resnet10t", {}, 1, 16, False, 512, [0.3], [0.3])
    export_encoder(backbone, description, storage, run_url)
    storage.write_json(f"{run_url}/config.json", {"storage": {"secret_access_key": SECRET}, "seed": seed})
    storage.write_json(
        f"{run_url}/metrics.json",
        {
            "run": run_url,
            "encoder": {
                "url": run_url,
                "sha256": storage.sha256(f"{run_url}/encoder.safetensors"),
                "description": description,
            },
            "dataset": {
                "name": "fashion-mnist",
                "version": "v-test",
                "manifest": "m.json",
                "fingerprint": "f",
                "splits": {"test": {"split": "test", "num_samples": 10, "fingerprint": test_set}},
            },
            "linear_probe_top1": top1,
            "knn_top1": top1,
            "models": {
                "encoder": {"linear_probe_top1": top1},
                "raw_pixels": {"linear_probe_top1": raw_pixels},
            },
            "protocol": {"linear_probe": "test"},
            "notes": [],
        },
    )
    return cfg


def _models(cfg: PipelineConfig) -> Storage:
    return Storage.from_config(cfg.storage)


def test_publish_then_load_gives_identical_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _evaluated_run(tmp_path, top1=0.9, seed=0)
    config = tmp_path / "config.yaml"
    assert cli(["--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"model_uri", "version", "promoted", "reason"} and summary["promoted"]
    storage = _models(cfg)
    assert read_latest(storage, "fmnist")["model_uri"] == summary["model_uri"]

    release = verify_release(storage, summary["model_uri"])
    assert set(release["files"]) == {
        "encoder.safetensors",
        "encoder.json",
        "metrics.json",
        "README.md",
        "timm/config.json",
        "timm/model.safetensors",
    }
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    published = load_encoder(summary["model_uri"])(images)
    original = load_encoder(storage.url("runs", "tiny"))(images)
    assert torch.equal(published, original)

    card = Path(summary["model_uri"], "README.md").read_text()
    assert f'load_encoder("{summary["model_uri"]}")' in card and "fashion-mnist" in card
    for path in (p for p in Path(summary["model_uri"]).rglob("*") if p.is_file()):
        assert SECRET not in path.read_bytes().decode(errors="ignore"), path


def test_gate_refuses_a_worse_model_and_keeps_the_better_latest(tmp_path: Path) -> None:
    good = run_publish(_evaluated_run(tmp_path, top1=0.9, seed=0))
    worse_cfg = _evaluated_run(tmp_path, top1=0.8, seed=1)
    worse = run_publish(worse_cfg)
    storage = _models(worse_cfg)
    assert good.promoted and not worse.promoted and "worse than latest" in worse.reason
    assert read_latest(storage, "fmnist")["version"] == good.version
    kept = verify_release(storage, worse.model_uri)  # the rejected release stays, marked and explained
    assert kept["promoted"] is False and kept["reason"] == worse.reason

    below = run_publish(_evaluated_run(tmp_path, top1=0.4, seed=2))
    assert not below.promoted and "below publish.min_top1" in below.reason
    forced = run_publish(worse_cfg, force=True)
    assert forced.promoted and read_latest(storage, "fmnist")["version"] == forced.version


def test_interrupted_publish_leaves_latest_on_the_previous_release(tmp_path: Path) -> None:
    first = run_publish(_evaluated_run(tmp_path, top1=0.9, seed=0))
    cfg = _evaluated_run(tmp_path, top1=0.95, seed=1)
    env = {**os.environ, CRASH_AFTER_ENV: "2"}  # SIGKILL right after the second release file is written
    result = subprocess.run(
        [sys.executable, "-m", "lejepa.publish.stage", "--config", str(tmp_path / "config.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr
    storage = _models(cfg)
    assert read_latest(storage, "fmnist")["version"] == first.version
    verify_release(storage, first.model_uri)
    partial = [
        p for p in Path(storage.url("models", "fmnist")).iterdir() if p.is_dir() and p.name != first.version
    ]
    assert len(partial) == 1 and not (partial[0] / RELEASE).exists()


def test_unevaluated_run_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _evaluated_run(tmp_path, top1=0.9, seed=0)
    Path(_models(cfg).url("runs", "tiny", "metrics.json")).unlink()
    assert cli(["--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `lejepa-pipeline evaluate` first" in err[0]


def test_publish_to_s3_and_load_back(tmp_path: Path, bucket: str) -> None:
    cfg = _evaluated_run(tmp_path, top1=0.9, seed=0, root=f"s3://{bucket}/store")
    summary = run_publish(cfg)
    storage = _models(cfg)
    assert summary.promoted and summary.model_uri.startswith(f"s3://{bucket}/store/models/fmnist/v")
    assert read_latest(storage, "fmnist")["model_uri"] == summary.model_uri
    verify_release(storage, summary.model_uri)
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    published = load_encoder(summary.model_uri, storage)(images)
    assert torch.equal(published, load_encoder(storage.url("runs", "tiny"), storage)(images))


def test_gate_compares_top1_only_on_the_same_test_set(tmp_path: Path) -> None:
    cfg = _evaluated_run(tmp_path, top1=0.9, seed=0, test_set="old-test-set")
    first, storage = run_publish(cfg), _models(cfg)
    latest = read_latest(storage, "fmnist")
    assert latest["test_set"] == "old-test-set" and latest["manifest"] == "m.json"

    # A lower number on another test set is not a regression: it cannot be compared, and the reason says so.
    other = run_publish(_evaluated_run(tmp_path, top1=0.8, seed=1, test_set="new-test-set"))
    assert other.promoted and "not compared with latest" in other.reason
    assert "different test set (new-test-set vs old-test-set)" in other.reason
    assert first.version in other.reason
    release = verify_release(storage, other.model_uri)
    assert release["test_set"] == "new-test-set" and release["manifest"] == "m.json"
    assert "test-set fingerprint: `new-test-set`" in Path(other.model_uri, "README.md").read_text()

    # On the same test set the numbers are compared again, and the worse one is refused.
    worse = run_publish(_evaluated_run(tmp_path, top1=0.7, seed=2, test_set="new-test-set"))
    assert not worse.promoted and "worse than latest" in worse.reason
    # Below publish.min_top1 is refused whatever the test set.
    below = run_publish(_evaluated_run(tmp_path, top1=0.4, seed=3, test_set="third-test-set"))
    assert not below.promoted and "below publish.min_top1" in below.reason
    assert read_latest(storage, "fmnist")["version"] == other.version


def test_a_release_pixels_beat_is_not_promoted_not_even_the_first(tmp_path: Path) -> None:
    weak = run_publish(_evaluated_run(tmp_path, 0.8, 0, "weak", None, "test-set-1", 0.85))
    assert not weak.promoted and "does not beat raw pixels (0.8500)" in weak.reason
    storage = Storage.from_config(load_config(None, [f"storage.root={tmp_path / 'store'}"]).storage)
    assert read_latest(storage, "fmnist") is None
    allowed = _evaluated_run(
        tmp_path, 0.8, 1, "weak2", None, "test-set-1", 0.85, "publish.beat_raw_pixels=false"
    )
    assert run_publish(allowed).promoted
    strong = run_publish(_evaluated_run(tmp_path, 0.9, 2, "strong", None, "test-set-1", 0.85))
    assert strong.promoted and "> raw pixels 0.8500" in strong.reason


def test_a_model_being_published_refuses_a_second_publisher(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _evaluated_run(tmp_path, top1=0.9, seed=0)
    storage = _models(cfg)
    model = storage.url("models", "fmnist")
    with Lease(storage, model, "published", settle=0):
        assert cli(["--config", str(tmp_path / "config.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {model} is being published by pid {os.getpid()}")
        assert read_latest(storage, "fmnist") is None and [p.name for p in Path(model).iterdir()] == [LEASE]
    assert cli(["--config", str(tmp_path / "config.yaml")]) == 0
    assert read_latest(storage, "fmnist") is not None and not Path(model, LEASE).exists()


@pytest.mark.parametrize("changed", ["encoder.safetensors", "encoder.json"])
def test_release_file_changed_after_publishing_is_refused(tmp_path: Path, changed: str):
    release = run_publish(_evaluated_run(tmp_path, top1=0.9, seed=0)).model_uri
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    original = load_encoder(release)(images)  # untouched: loads

    path = Path(release, changed)
    if changed == "encoder.json":
        description = json.loads(path.read_text())
        path.write_text(json.dumps({**description, "mean": [0.5]}))
    else:  # the last byte of the last tensor: still a valid safetensors file, other weights
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{re.escape(str(path))} does not match its sha256 in release.json"):
        load_encoder(release)
    # A run folder has no release.json: its files are not checksummed.
    run = Path(tmp_path, "store", "runs", "tiny", changed)
    run.write_bytes(path.read_bytes())
    assert load_encoder(str(run.parent))(images).shape == original.shape
