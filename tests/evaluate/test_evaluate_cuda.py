"""Evaluation on a GPU gives the CPU's numbers up to rounding (skipped where torch sees no CUDA device)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import test_evaluate
import torch
from test_probes import CLASSES, _clusters

import lejepa.evaluate.stage as evaluate
from lejepa.config import load_config
from lejepa.evaluate.features import (
    calibrate_batchnorm,
    extract_features,
    in_precision,
    on_device,
    random_init_encoder,
)
from lejepa.evaluate.probes import effective_rank, knn_classify, linear_probe, sigreg_statistic, top1
from lejepa.objective.model import create_backbone
from lejepa.train.export import FrozenEncoder, encoder_description

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# The tiny run (digits shards and an exported encoder) of test_evaluate.py and its CPU evaluation.
digits_run, evaluated = test_evaluate.digits_run, test_evaluate.evaluated


def _encoder(backbone: str = "resnet18", seed: int = 0) -> FrozenEncoder:
    torch.manual_seed(seed)
    network = create_backbone(backbone, in_chans=1, small_input=True)
    return FrozenEncoder(
        network, encoder_description(backbone, {}, 1, 28, True, network.num_features, [0.3], [0.3])
    )


def _batches(n: int = 96, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return list(zip(images.split(batch_size), torch.arange(n).split(batch_size), strict=True))


def _on_cuda(module: torch.nn.Module) -> bool:
    return all(t.device.type == "cuda" for t in [*module.parameters(), *module.buffers()])


def test_cuda_features_are_close_to_cpu_fp32() -> None:
    frozen = _encoder()
    calibrate_batchnorm(frozen, torch.cat([images for images, _ in _batches()]), 32)
    on_gpu = copy.deepcopy(frozen).to(CUDA)
    exact = extract_features({"f": in_precision(frozen, "fp32")}, on_device(_batches(), CPU))
    for precision, tolerance in (("fp32", 0.999), ("bf16", 0.99)):
        extractors = {"f": in_precision(on_gpu, precision)}
        features = extract_features(extractors, on_device(_batches(), CUDA))
        assert features["f"].dtype == torch.float32 and features["f"].device == CPU
        assert torch.equal(features["labels"], exact["labels"])
        assert torch.nn.functional.cosine_similarity(features["f"], exact["f"]).min() > tolerance, precision


def test_random_init_baseline_is_calibrated_and_runs_on_the_device() -> None:
    description = _encoder().description
    images = torch.cat([images for images, _ in _batches()])
    on_cpu = random_init_encoder(description, seed=0)
    on_gpu = random_init_encoder(description, seed=0).to(CUDA)
    calibrate_batchnorm(on_cpu, images, 32)
    calibrate_batchnorm(on_gpu, images.to(CUDA), 32)
    assert _on_cuda(on_gpu) and not on_gpu.training
    assert torch.equal(on_gpu.backbone.conv1.weight.cpu(), on_cpu.backbone.conv1.weight)  # the same init
    torch.testing.assert_close(
        on_gpu.backbone.bn1.running_mean.cpu(), on_cpu.backbone.bn1.running_mean, rtol=1e-2, atol=1e-3
    )
    features = extract_features({"f": in_precision(on_gpu, "bf16")}, on_device(_batches(), CUDA))
    assert torch.nn.functional.cosine_similarity(features["f"], on_cpu(images)).min() > 0.99


def test_probes_and_diagnostics_on_cuda_score_like_the_cpu() -> None:
    train_x, train_y = _clusters(2000, seed=1, spread=1.0)
    test_x, test_y = _clusters(500, seed=2, spread=1.0)
    gpu = [t.to(CUDA) for t in (train_x, train_y, test_x, test_y)]
    options = {"epochs": 10, "batch_size": 256, "seed": 3}
    linear_cpu = linear_probe(train_x, train_y, test_x, CLASSES, **options)
    linear_gpu = linear_probe(*gpu[:3], CLASSES, **options)
    assert linear_gpu.device.type == "cuda"
    assert torch.equal(linear_gpu, linear_probe(*gpu[:3], CLASSES, **options))  # seeded on the GPU too
    assert abs(top1(linear_gpu, gpu[3]) - top1(linear_cpu, test_y)) <= 0.02
    knn_cpu, knn_gpu = knn_classify(train_x, train_y, test_x, CLASSES), knn_classify(*gpu[:3], CLASSES)
    chunked = knn_classify(*gpu[:3], CLASSES, chunk_size=64, train_chunk_size=300)
    assert knn_gpu.device.type == "cuda" and (chunked == knn_gpu).float().mean() >= 0.99
    assert abs(top1(knn_gpu, gpu[3]) - top1(knn_cpu, test_y)) <= 0.02
    assert math.isclose(effective_rank(gpu[0]), effective_rank(train_x), rel_tol=1e-4)
    assert math.isclose(sigreg_statistic(gpu[0], 256), sigreg_statistic(train_x, 256), rel_tol=1e-3)


def test_evaluate_on_cuda_end_to_end(digits_run: Path, evaluated: dict) -> None:
    summary = evaluate.run_evaluate(
        load_config(digits_run, ["evaluate.device=cuda", "evaluate.precision=auto"])
    )
    metrics = json.loads(Path(summary.metrics).read_text())
    assert metrics["protocol"]["features"].endswith("networks in bf16 on cuda")
    assert not any("cache" in note for note in summary.notes)  # bf16 features are not the CPU's fp32 ones
    cpu = evaluated
    assert abs(summary.baselines["raw_pixels"] - cpu["baselines"]["raw_pixels"]) <= 0.02  # the same pixels
    assert abs(summary.linear_probe_top1 - cpu["linear_probe_top1"]) <= 0.05
    assert abs(summary.knn_top1 - cpu["knn_top1"]) <= 0.05
    for name in ("encoder", "random_init"):
        scores = metrics["models"][name]
        assert 1.0 <= scores["rankme"] <= 512 and scores["sigreg"] > 0
        assert math.isfinite(scores["lejepa_loss"]) and scores["lejepa_loss"] > 0
