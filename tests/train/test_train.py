"""The pretrain stage for real: DeepSpeed ranks as separate processes talking over gloo on the CPU.

Every test launches `lejepa.train.rank` through `lejepa.train.launch` on a small digits dataset and checks
what the run left in storage: the metrics log, the checkpoints, the exported encoder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lejepa
from lejepa.config import load_config
from lejepa.data.shard import write_shards
from lejepa.store.storage import Storage
from lejepa.train.checkpoint import _deepspeed_types
from lejepa.train.launch import LaunchFailed, free_port
from lejepa.train.pretrain import run_pretrain
from lejepa.train.schedule import warmup_cosine

# Small enough for two ranks on two cores: a few seconds a step, losses still clearly falling.
BASE = {
    "data": {"source": "digits"},
    "model": {"backbone": "resnet10t", "proj_hidden_dim": 256, "proj_dim": 64},
    "views": {"local_views": 2},
    "loss": {"num_slices": 128},
    "pretrain": {"batch_size": 32, "max_steps": 12, "checkpoint_every": 4, "num_workers": 1, "lr": 2e-3},
    "launch": {"nproc_per_node": 2},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
    return root


def write_config(path: Path, store: Path, run_name: str, **sections: dict) -> Path:
    tree = json.loads(json.dumps(BASE))
    tree["storage"] = {"root": str(store)}
    tree["pretrain"]["run_name"] = run_name
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def pretrain(config: Path, *overrides: str) -> dict:
    args = ["--config", str(config)] + [a for o in overrides for a in ("--set", o)]
    return run_pretrain(load_config(config, list(overrides)), args)


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir, "encoder.safetensors")))


@pytest.mark.parametrize(
    ("zero_stage", "views_on_device", "precision"),
    [(2, False, "fp32"), (3, False, "fp32"), (2, True, "bf16")],
)
def test_two_ranks_lower_the_loss(
    tmp_path: Path, store: Path, zero_stage: int, views_on_device: bool, precision: str
) -> None:
    config = write_config(
        tmp_path / "cfg.yaml",
        store,
        f"zero{zero_stage}-{views_on_device}",
        pretrain={"zero_stage": zero_stage, "precision": precision},
        views={"on_device": views_on_device},
    )
    summary = pretrain(config)

    assert summary["steps"] == 12
    log = metrics(summary["run_dir"])
    assert [r["step"] for r in log] == list(range(1, 13))
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first, f"ZeRO-{zero_stage}: loss went from {first:.4f} to {last:.4f}"
    assert all(0.0 <= r["data_wait"] <= 1.0 and r["images_per_s"] > 0 for r in log)
    assert "probe_acc" in log[-1]  # digits are labelled: the online probe runs
    # The exported backbone loads without DeepSpeed and embeds images.
    encoder = lejepa.load_encoder(summary["encoder"])
    embeddings = encoder(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8))
    assert embeddings.shape == (5, encoder.embed_dim) and torch.isfinite(embeddings).all()
    if zero_stage < 3:  # ZeRO-3 splits the module's state across files
        # Parameters in the training precision; BatchNorm's running statistics fp32 whatever it is.
        tag = json.loads(Path(summary["run_dir"], "checkpoints", "latest.json").read_text())["tag"]
        with torch.serialization.safe_globals(_deepspeed_types()):
            states = torch.load(
                Path(summary["run_dir"], "checkpoints", tag, "mp_rank_00_model_states.pt"), weights_only=True
            )["module"]
        statistics = [v for k, v in states.items() if k.endswith(("running_mean", "running_var"))]
        assert len(statistics) > 10 and all(v.dtype == torch.float32 for v in statistics)
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert states["encoder.backbone.conv1.0.weight"].dtype == expected


def test_zero_2_clips_by_the_norm_of_every_ranks_gradients(tmp_path: Path, store: Path) -> None:
    # Under ZeRO-2 each rank's optimizer holds a part of the gradients, a group at a time: the clip must
    # still use the norm of all of them, the one ZeRO-0 computes where every rank holds everything.
    norms = {}
    for stage in (0, 2):
        config = write_config(
            tmp_path / f"cfg{stage}.yaml",
            store,
            f"norm-zero{stage}",
            pretrain={
                "zero_stage": stage,
                "max_steps": 3,
                "checkpoint_every": 3,
                "log_every": 1,
                "grad_clip": 0.5,
            },
        )
        norms[stage] = [r["grad_norm"] for r in metrics(pretrain(config)["run_dir"])]
    assert min(norms[0]) > 0.5  # above pretrain.grad_clip: every step is clipped
    assert norms[2] == pytest.approx(norms[0], rel=1e-4)


def test_two_launcher_agents_as_two_nodes_train_together(tmp_path: Path, store: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    node = {
        "mode": "hostfile",
        "hostfile": str(hostfile),
        "no_ssh": True,
        "master_addr": "127.0.0.1",
        "master_port": free_port(),
        "launcher": "deepspeed",
    }
    configs = [
        write_config(
            tmp_path / f"node{rank}.yaml",
            store,
            "two-nodes",
            launch={**node, "node_rank": rank},
            pretrain={"max_steps": 4},
        )
        for rank in (0, 1)
    ]
    with ThreadPoolExecutor(2) as pool:
        summaries = list(pool.map(pretrain, configs))
    assert summaries[0] == summaries[1] and summaries[0]["steps"] == 4
    assert [r["step"] for r in metrics(summaries[0]["run_dir"])] == [1, 2, 3, 4]


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, store: Path) -> None:
    reference = pretrain(write_config(tmp_path / "ref.yaml", store, "uninterrupted"))

    config = write_config(tmp_path / "cfg.yaml", store, "killed")
    marker = store / "runs" / "killed" / "checkpoints" / "latest.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lejepa.train.pretrain", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (marker.exists() and json.loads(marker.read_text())["step"] >= 4):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-run
        proc.wait()
    killed_at = json.loads(marker.read_text())["step"]
    assert killed_at < 12

    resumed = pretrain(config)
    assert resumed["steps"] == reference["steps"] == 12
    assert [r["step"] for r in metrics(resumed["run_dir"])] == list(range(1, 13))
    expected, actual = weights(reference["run_dir"]), weights(resumed["run_dir"])
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "cfg.yaml", store, "diverges", pretrain={"checkpoint_every": 1})
    # An absurd learning rate turns the weights to inf after the first update: step 2's loss is NaN.
    with pytest.raises(LaunchFailed) as failed:
        pretrain(config, "pretrain.lr=1e30", "pretrain.grad_clip=0")
    error = str(failed.value)
    assert "loss is nan at step 2" in error and "stays the latest" in error, error
    marker = store / "runs" / "diverges" / "checkpoints" / "latest.json"
    assert json.loads(marker.read_text())["step"] == 1
    assert not (store / "runs" / "diverges" / "encoder.json").exists()


def test_checkpoints_and_resume_on_s3(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Credentials come from the AWS_* environment (the aws_env fixture); every rank inherits it.
    root = f"s3://{bucket}/store"
    write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
    config = tmp_path / "cfg.yaml"
    tree = yaml.safe_load(write_config(config, tmp_path, "on-s3").read_text())
    tree["storage"] = {"root": root}
    config.write_text(yaml.safe_dump(tree))

    first = pretrain(config, "pretrain.max_steps=4", "pretrain.checkpoint_every=2")
    capsys.readouterr()
    resumed = pretrain(config, "pretrain.max_steps=6", "pretrain.checkpoint_every=2")
    assert "resuming at step 4" in capsys.readouterr().out  # downloaded from S3, not restarted

    storage = Storage(root)
    assert first["steps"] == 4 and resumed["steps"] == 6
    assert storage.read_json(f"{root}/runs/on-s3/checkpoints/latest.json")["step"] == 6
    log = [json.loads(line) for line in storage.read_bytes(f"{root}/runs/on-s3/metrics.jsonl").splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # From its first step on, the resumed run follows the 6-step schedule, not the rate the 4-step one left.
    p = load_config(config, []).pretrain
    assert log[4]["lr"] == pytest.approx(p.lr * warmup_cosine(4, 6, p.warmup_fraction, p.min_lr_ratio))
    encoder = lejepa.load_encoder(resumed["encoder"], storage)
    assert encoder(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)).shape == (2, encoder.embed_dim)


def test_online_probe_starts_equal_on_every_rank_and_skips_unlabelled_samples() -> None:
    from lejepa.train.online_probe import OnlineProbe

    torch.manual_seed(1)  # each rank seeds its global RNG with seed + rank
    first = OnlineProbe(8, 3, torch.device("cpu"), seed=0)
    torch.manual_seed(2)
    second = OnlineProbe(8, 3, torch.device("cpu"), seed=0)
    assert torch.equal(first.head.weight, second.head.weight)

    embeddings = torch.randn(2, 4, 8)
    before = first.head.weight.clone()
    loss, accuracy = first.step(embeddings, torch.tensor([-1, -1, -1, -1])).tolist()
    assert (loss, accuracy) == (0.0, 0.0) and torch.equal(first.head.weight, before)
    loss, accuracy = first.step(embeddings, torch.tensor([0, -1, 2, -1])).tolist()
    assert loss > 0 and accuracy in (0.0, 0.5, 1.0)  # over the two labelled samples only


def test_time_budget_ends_the_run_and_its_schedule_on_time(tmp_path: Path, store: Path) -> None:
    config = write_config(
        tmp_path / "cfg.yaml",
        store,
        "budget",
        pretrain={"max_steps": 10_000, "time_budget_s": 15, "log_every": 10, "checkpoint_every": 1000},
    )
    summary = pretrain(config)
    log = metrics(summary["run_dir"])
    trained = sum(64 / r["images_per_s"] for r in log)  # 2 ranks x 32 images a step
    assert summary["steps"] == len(log) < 10_000
    assert 0.9 * 15 <= trained <= 2 * 15, f"trained {trained:.1f} s of a 15 s budget"
    peak = max(r["lr"] for r in log)
    assert log[-1]["lr"] < 0.25 * peak  # the cosine reached its end with the budget, not with max_steps
    assert log[3]["lr"] > 0.1 * peak  # the warm-up is planned on the budget from step 2, used from step 4
    assert json.loads(Path(summary["checkpoint"], "..", "latest.json").read_text())["step"] == len(log)
