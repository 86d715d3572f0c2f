"""The evaluation's scores of each feature set: the probes' top-1 on the test split
(`lejepa.evaluate.probes`) and the label-free diagnostics of its embeddings
(`lejepa.evaluate.diagnostics`), with the settings of `evaluate.*`.

Raw pixels are standardised first, so "logistic regression on raw pixels" is the same linear probe on
standardised, flattened pixels, and kNN compares centred pixels.
"""

from __future__ import annotations

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
) -> dict[str, float]:
    """Linear-probe and kNN top-1 on the labelled samples of the test split."""
    e = cfg.evaluate
    keep_train, keep_test = train_labels >= 0, test_labels >= 0
    train, train_labels = train[keep_train].float(), train_labels[keep_train]
    test, test_labels = test[keep_test].float(), test_labels[keep_test]
    linear = linear_probe(
        train,
        train_labels,
        test,
        num_classes,
        epochs=e.probe_epochs,
        batch_size=e.probe_batch_size,
        lr=e.probe_lr,
        weight_decay=e.probe_weight_decay,
        warmup_fraction=e.probe_warmup_fraction,
        seed=cfg.seed,
    )
    knn = knn_classify(train, train_labels, test, num_classes, k=e.knn_k, temperature=e.knn_temperature)
    return {"linear_probe_top1": top1(linear, test_labels), "knn_top1": top1(knn, test_labels)}


def model_scores(
    name: str,
    features: dict[str, dict[str, Tensor]],
    labelled: bool,
    num_classes: int,
    cfg: PipelineConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The probes (on labelled data) and the embedding diagnostics of feature set `name`, on `device`."""
    train, test = features["train"][name].to(device), features["test"][name].to(device)
    if name == RAW_PIXELS:  # centred pixels give kNN a fair cosine similarity too
        train, test = standardised(train, test)
    scores: dict[str, Any] = {}
    if labelled:
        labels = {role: features[role]["labels"].to(device) for role in ("train", "test")}
        scores.update(probe_scores(train, labels["train"], test, labels["test"], num_classes, cfg))
    if name != RAW_PIXELS:
        scores.update(embedding_diagnostics(test[: cfg.evaluate.diagnostic_samples], cfg))
    return scores
