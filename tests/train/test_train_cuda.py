"""The pretrain stage on a GPU: one rank launched by torchrun, NCCL, bf16 (skipped without CUDA).

NCCL takes device tensors only, so these runs fail if any collective of the training step, the checkpoint
or the export gets a CPU tensor, as the first GPU run did.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_step import host_reads

import lejepa
from lejepa.config import load_config
from lejepa.data.shard import write_shards
from lejepa.data.stream import batch_generator
from lejepa.objective.views import MultiCropViews
from lejepa.train.pretrain import run_pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
    return root


@pytest.mark.parametrize(("zero_stage", "views_on_device"), [(0, False), (2, True)])
def test_one_gpu_rank_trains_checkpoints_and_exports(
    store: Path, zero_stage: int, views_on_device: bool
) -> None:
    overrides = [
        f"storage.root={store}",
        "data.source=digits",
        "model.backbone=vit_tiny_patch16_224",
        "model.backbone_kwargs={patch_size: 4}",
        "views.global_size=16",
        "views.local_size=8",
        f"views.on_device={str(views_on_device).lower()}",
        "loss.num_slices=256",
        f"pretrain.run_name=cuda-zero{zero_stage}-{views_on_device}",
        "pretrain.batch_size=64",
        "pretrain.max_steps=12",
        "pretrain.checkpoint_every=5",
        "pretrain.log_every=4",
        "pretrain.precision=bf16",
        f"pretrain.zero_stage={zero_stage}",
        "launch.accelerator=cuda",
        "launch.nproc_per_node=1",
    ]
    cfg = load_config(None, overrides)
    summary = run_pretrain(cfg, [a for o in overrides for a in ("--set", o)])

    log = [json.loads(line) for line in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["probe_acc"]) for r in log)
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    marker = json.loads(Path(summary["run_dir"], "checkpoints", "latest.json").read_text())
    assert marker["step"] == 12
    encoder = lejepa.load_encoder(summary["encoder"], device="cuda")
    embeddings = encoder(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, device="cuda"))
    assert embeddings.shape == (4, encoder.embed_dim) and torch.isfinite(embeddings).all()


def test_views_on_the_gpu_follow_the_batch_generator() -> None:
    views = MultiCropViews(channels=3, global_size=32, local_size=16).cuda()
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, device="cuda")
    first = views(images, batch_generator(0, 1, 0, 5, "cuda"))
    again = views(images, batch_generator(0, 1, 0, 5, "cuda"))
    other = views(images, batch_generator(0, 1, 0, 6, "cuda"))
    assert first[0].device.type == "cuda" and first[0].shape == (2, 8, 3, 32, 32)
    assert first[1].shape == (6, 8, 3, 16, 16)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("zero_stage", [2, 1, 0])
def test_training_steps_on_the_gpu_never_wait_for_it(tmp_path: Path, zero_stage: int) -> None:
    # The CPU test's program, on the GPU: its steps run under torch's sync debug mode set to error.
    report = host_reads(
        tmp_path,
        "model.backbone=vit_tiny_patch16_224",
        "model.backbone_kwargs={patch_size: 4}",
        "views.global_size=16",
        "views.local_size=8",
        "views.on_device=true",
        "pretrain.precision=bf16",
        f"pretrain.zero_stage={zero_stage}",
    )
    assert report["steps"] == 3
    assert report["reads"] == [] and report["synchronizes"] == 0, report


def test_views_on_the_gpu_never_wait_for_it() -> None:
    views = MultiCropViews(channels=3, global_size=32, local_size=16).cuda()
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, device="cuda")
    views(images, batch_generator(0, 1, 0, 5, "cuda"))  # first call: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        global_views, local_views = views(images, batch_generator(0, 1, 0, 6, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert global_views.shape == (2, 8, 3, 32, 32) and local_views.shape == (6, 8, 3, 16, 16)
