"""The evaluation's scores of each feature set: the probes' top-1 on the test split
(`lejepa.evaluate.probes`) and the label-free diagnostics of its embeddings
(`lejepa.evaluate.diagnostics`), with the settings of `evaluate.*`.

Every feature set goes through the same rules. Both probes read features standardised per dimension with
the training split's mean and std, so "logistic regression on raw pixels" is the same linear probe on
standardised, flattened pixels, and the kNN's cosine compares centred features, not, say, the all-positive
outputs of a ReLU network. DINO's kNN, on the features as they are, is reported beside it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor

from lejepa.config import PipelineConfig
from lejepa.evaluate.diagnostics import embedding_diagnostics
from lejepa.evaluate.features import RAW_PIXELS
from lejepa.evaluate.probes import knn_classify, linear_probe, standardised, top1


def has_labels(features: dict[str, dict[str, Tensor]], num_classes: int) -> bool:
    """Whether the probes can run: the dataset has classes and both splits have labelled samples."""
    return (
        num_classes > 0
        and bool((features["train"]["labels"] >= 0).any())
        and bool((features["test"]["labels"] >= 0).any())
    )


def probe_scores(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    test_labels: Tensor,
    num_classes: int,
    cfg: PipelineConfig,
) -> tuple[dict[str, Any], Tensor]:
    """Linear-probe and kNN top-1 on the labelled samples of the test split, and which test samples the kNN
    got right.

    The linear probe is trained `evaluate.probe_seeds` times (seeds seed, seed+1, ...): its top-1 is their
    mean and `linear_probe_spread` (max - min) their spread. The kNN vote draws nothing: one run on the
    standardised features (`knn_top1`), and one on the features as they are (`knn_dino_top1`, DINO's rule).
    """
    e = cfg.evaluate
    keep_train, keep_test = train_labels >= 0, test_labels >= 0
    train, train_labels = train[keep_train].float(), train_labels[keep_train]
    test, test_labels = test[keep_test].float(), test_labels[keep_test]
    linear = [
        top1(
            linear_probe(
                train,
                train_labels,
                test,
                num_classes,
                epochs=e.probe_epochs,
                batch_size=e.probe_batch_size,
                lr=e.probe_lr,
                weight_decay=e.probe_weight_decay,
                warmup_fraction=e.probe_warmup_fraction,
                seed=cfg.seed + i,
            ),
            test_labels,
        )
        for i in range(e.probe_seeds)
    ]

    def knn(train: Tensor, test: Tensor) -> Tensor:
        return knn_classify(train, train_labels, test, num_classes, k=e.knn_k, temperature=e.knn_temperature)

    standard = knn(*standardised(train, test))
    scores = {
        "linear_probe_top1": statistics.fmean(linear),
        "linear_probe_spread": max(linear) - min(linear),
        "linear_probe_seeds": linear,
        "knn_top1": top1(standard, test_labels),
        "knn_dino_top1": top1(knn(train, test), test_labels),
    }
    return scores, (standard == test_labels).cpu()


def model_scores(
    name: str,
    features: dict[str, dict[str, Tensor]],
    labelled: bool,
    num_classes: int,
    cfg: PipelineConfig,
    device: torch.device,
) -> tuple[dict[str, Any], Tensor | None]:
    """The probes (on labelled data) and the embedding diagnostics of feature set `name`, on `device`; and
    which test samples its kNN got right (None without labels)."""
    train, test = features["train"][name].to(device), features["test"][name].to(device)
    scores: dict[str, Any] = {}
    knn_correct = None
    if labelled:
        labels = {role: features[role]["labels"].to(device) for role in ("train", "test")}
        probes, knn_correct = probe_scores(train, labels["train"], test, labels["test"], num_classes, cfg)
        scores.update(probes)
    if name != RAW_PIXELS:
        scores.update(embedding_diagnostics(test[: cfg.evaluate.diagnostic_samples], cfg))
    return scores, knn_correct


def gap(
    ours: dict[str, Any], baseline: dict[str, Any], ours_knn: Tensor, baseline_knn: Tensor
) -> dict[str, dict[str, Any]]:
    """How far the encoder is above a baseline on each probe, and whether that is beyond the probe's noise.

    - linear probe: the noise is the larger spread of the two models' probe seeds (None with one seed);
    - kNN, which draws nothing: the noise is two standard errors of the paired difference on this test set
      (McNemar's: the samples exactly one of the two got right, b + c of them, give sqrt(b + c) / n).
    A gap counts as beyond the noise when it is larger than it in size: the encoder is then better (or
    worse) than the baseline, not equal to it.
    """
    seeds = len(ours["linear_probe_seeds"])
    linear_noise = max(ours["linear_probe_spread"], baseline["linear_probe_spread"]) if seeds > 1 else None
    disagree = int((ours_knn != baseline_knn).sum())
    knn_noise = 2 * math.sqrt(disagree) / len(ours_knn) if len(ours_knn) else None
    return {
        probe: _marked(ours[key] - baseline[key], noise)
        for probe, key, noise in (
            ("linear_probe", "linear_probe_top1", linear_noise),
            ("knn", "knn_top1", knn_noise),
        )
    }


def _marked(difference: float, noise: float | None) -> dict[str, Any]:
    beyond = None if noise is None else abs(difference) > noise
    return {"gap": difference, "noise": noise, "beyond_noise": beyond}
