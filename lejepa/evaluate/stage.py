"""Evaluate stage: how good the run's encoder is, beside baselines scored in the same run on the same splits.

1. `lejepa.evaluate.features`: frozen features of the train and test splits (batched, no augmentation) for our
   encoder, the same architecture at random initialisation (seeded), and the raw pixels. They are cached
   in the run folder, keyed by a fingerprint of the encoder weights' sha256, the manifest, the split and
   the precision (not the device), so a retry reads them back instead of recomputing.
2. `lejepa.evaluate.scoring`: linear probe and kNN top-1 on the test split (`lejepa.evaluate.probes`), for
every feature set
   that has labels: "logistic regression on raw pixels" is the same linear probe on standardised,
   flattened pixels.
3. `lejepa.evaluate.diagnostics`: label-free diagnostics on held-out (test) images: RankMe and the SIGReg
statistic
   of the embeddings, and, when the run exported its projector, the LeJEPA loss and its parts on
   multi-crop views.
4. `lejepa.evaluate.report`: `evaluation.png`, `evaluation.md` and `report.html` in the run folder, then
   `metrics.json`; the summary is printed last.

All of it runs on `evaluate.device` (a GPU when there is one): images reach it from pinned memory without
blocking, the networks run in `evaluate.precision` (bf16 autocast on a GPU by default), and their features
come back to the CPU as float32 once a split is done.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import PipelineConfig, redacted
from lejepa.data.manifest import ShardManifest, locate_manifest
from lejepa.evaluate.diagnostics import heldout_losses
from lejepa.evaluate.features import (
    ENCODER,
    RANDOM_INIT,
    Extractor,
    cached_features,
    calibrate_batchnorm,
    extractors_of,
    features_key,
    first_images,
    random_init_encoder,
    split_features,
)
from lejepa.evaluate.report import write_evaluation_reports
from lejepa.evaluate.scoring import gap, has_labels, model_scores
from lejepa.store import layout
from lejepa.store.storage import Storage
from lejepa.tracking import Tracker, dataset_tags, evaluation_metrics
from lejepa.train.export import FrozenEncoder, load_encoder
from lejepa.train.precision import resolve_precision

READ_OUTS = {
    "last": "the backbone's pooled output",
    "last2": "a ViT's class tokens of its last two blocks, concatenated; a CNN's pooled last stage",
}


class EvaluationError(RuntimeError):
    """Something evaluation needs is missing (no exported encoder, no such split); the message says what."""


@dataclass
class EvalSummary:
    metrics: str
    """URL of metrics.json."""
    linear_probe_top1: float | None
    knn_top1: float | None
    baselines: dict[str, float | None]
    """Baseline name -> linear-probe top-1 (None when the data is unlabelled)."""
    report: str = ""
    figure: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Target:
    """What one evaluation scores, and where: the run, the dataset version and its splits, the device."""

    cfg: PipelineConfig
    storage: Storage
    run: str
    """URL of the run folder."""
    manifest_url: str
    manifest: ShardManifest
    splits: dict[str, str]
    """Role ("train", "test") -> split name."""
    device: torch.device
    precision: str
    """The networks' arithmetic, resolved: "fp32" or "bf16"."""


# -- the run, its dataset and the device ---------------------------------------------------------------


def resolve_device(requested: str) -> torch.device:
    """The device `evaluate.device` names: auto is cuda when torch sees a GPU, else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(
            "evaluate.device=cuda, but torch sees no CUDA GPU here: set evaluate.device=auto (or cpu) to "
            "evaluate on the CPU, or run where a GPU is visible"
        )
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def run_manifest(cfg: PipelineConfig, storage: Storage, run_url: str) -> str:
    """The manifest to score on: `data.manifest` when set; else the one the run recorded that it trained on
    (its summary.json), so a dataset sharded since never replaces it; else, for a run from before that record,
    the one `locate_manifest` finds."""
    summary_url = f"{run_url}/{layout.SUMMARY}"
    if not cfg.data.manifest and storage.exists(summary_url):
        recorded = storage.read_json(summary_url).get("manifest")
        if recorded:
            return recorded
    return locate_manifest(cfg, storage)


def _test_split(cfg: PipelineConfig, manifest: ShardManifest) -> str:
    split = cfg.evaluate.test_split or ("test" if "test" in manifest.splits else "val")
    for name, value in (("train_split", cfg.evaluate.train_split), ("test_split", split)):
        if value not in manifest.splits:
            raise EvaluationError(
                f"evaluate.{name}: dataset {manifest.name}/{manifest.version} has no split '{value}' "
                f"(has {sorted(manifest.splits)})"
            )
    return split


def resolve_target(cfg: PipelineConfig) -> Target:
    """The run `pretrain.run_name`, the dataset version and splits to score it on, the device and precision.

    The device is checked before anything is read, and the run's export before anything is written.
    """
    device = resolve_device(cfg.evaluate.device)
    precision = resolve_precision(cfg.evaluate.precision, device.type)
    storage = Storage.from_config(cfg.storage)
    run = layout.run_url(storage, cfg.pretrain.run_name)
    if not storage.exists(f"{run}/{layout.DESCRIPTION}"):
        raise EvaluationError(
            f"no exported encoder in {run}: run `lejepa-pipeline pretrain` with pretrain.run_name="
            f"{cfg.pretrain.run_name} first"
        )
    manifest_url = run_manifest(cfg, storage, run)
    manifest = ShardManifest.load(storage, manifest_url)
    splits = {"train": cfg.evaluate.train_split, "test": _test_split(cfg, manifest)}
    return Target(cfg, storage, run, manifest_url, manifest, splits, device, precision)


# -- features, scores and the metrics ------------------------------------------------------------------


def _networks(target: Target, encoder: FrozenEncoder) -> dict[str, FrozenEncoder]:
    """Our encoder and, with baselines on, the same architecture at random init, its BatchNorm calibrated."""
    e = target.cfg.evaluate
    networks = {ENCODER: encoder}
    if e.baselines:
        networks[RANDOM_INIT] = random_init_encoder(encoder.description, target.cfg.seed).to(target.device)
        calibration = first_images(
            target.manifest, target.storage, e.train_split, e.calibration_samples, e.batch_size
        )
        calibrate_batchnorm(networks[RANDOM_INIT], calibration.to(target.device), e.batch_size)
    return networks


def _features(
    target: Target, extractors: dict[str, Extractor], weights_sha256: str
) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Every feature set of the train and test splits ({role: {name: (N, D), "labels": (N,)}}), read from
    the cache where an earlier try wrote them; and a note for each split the cache served."""
    e = target.cfg.evaluate
    features: dict[str, dict[str, Tensor]] = {}
    notes: list[str] = []
    for role, split in target.splits.items():
        key = features_key(weights_sha256, target.manifest, split, extractors, target.precision, target.cfg)
        url = layout.features_url(target.run, split, key)
        compute = partial(
            split_features,
            extractors,
            target.manifest,
            target.storage,
            split,
            target.device,
            e.batch_size,
            e.num_workers,
        )
        features[role], hit = cached_features(target.storage, url, compute)
        if hit:
            notes.append(f"{split} features read from the cache {url}")
    return features, notes


def _scores(
    target: Target,
    features: dict[str, dict[str, Tensor]],
    names: list[str],
    networks: dict[str, FrozenEncoder],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each feature set's probes and diagnostics, the networks' held-out LeJEPA loss, and each baseline's
    `gap_to_encoder` (`lejepa.evaluate.scoring.gap`); and what was skipped."""
    num_classes = target.manifest.num_classes
    labelled = has_labels(features, num_classes)
    results, knn_correct = {}, {}
    for name in names:
        results[name], knn_correct[name] = model_scores(
            name, features, labelled, num_classes, target.cfg, target.device
        )
    if labelled:
        for name in (n for n in names if n != ENCODER):
            results[name]["gap_to_encoder"] = gap(
                results[ENCODER], results[name], knn_correct[ENCODER], knn_correct[name]
            )
    notes = []
    if not labelled:
        notes.append(
            "unlabelled data: probes skipped (linear probe, kNN); the label-free diagnostics still ran"
        )
    losses = heldout_losses(
        target.cfg,
        target.storage,
        target.run,
        target.manifest,
        target.splits["test"],
        networks,
        target.device,
    )
    if losses is None:
        notes.append(
            f"LeJEPA loss diagnostic skipped: the run has no {layout.PROJECTOR} (exported before projectors "
            "were)"
        )
    for name, values in (losses or {}).items():
        results[name].update(values)
    return results, notes


def _dataset(target: Target) -> dict[str, Any]:
    """The dataset version scored on; a split's fingerprint names its samples, so the publish gate compares
    top-1 only on equal test sets."""
    m = target.manifest
    return {
        "name": m.name,
        "version": m.version,
        "manifest": target.manifest_url,
        "fingerprint": m.source.get("fingerprint"),
        "splits": {
            role: {"split": s, "num_samples": m.num_samples[s], "fingerprint": m.splits[s].fingerprint}
            for role, s in target.splits.items()
        },
        "num_classes": m.num_classes,
    }


def _protocol(target: Target) -> dict[str, str]:
    e, device = target.cfg.evaluate, target.device.type
    return {
        "linear_probe": (
            f"standardised features -> LayerNorm + Linear, AdamW (weight decay {e.probe_weight_decay}), "
            f"lr {e.probe_lr}, "
            f"{e.probe_epochs} epochs of batch {e.probe_batch_size}, "
            f"warm-up {e.probe_warmup_fraction} + cosine; the mean of {e.probe_seeds} seed(s)"
        ),
        "features": (
            f"one deterministic view per image, networks in {target.precision} on {device}, read out as "
            f"{e.features} ({READ_OUTS[e.features]})"
        ),
        "knn": (
            f"cosine similarity of standardised features, k={e.knn_k}, votes weighted by exp(similarity / "
            f"{e.knn_temperature}); DINO's: the same on the features as they are"
        ),
        "noise": (
            "a gap to a baseline is beyond the noise when larger than it: for the linear probe the larger "
            "spread of the two models' probe seeds, for kNN two standard errors of the paired difference"
        ),
        "raw_pixels": "flattened pixels, under the same rules (the linear probe: logistic regression)",
        "diagnostics": f"first {e.diagnostic_samples} samples of the {target.splits['test']} split",
    }


def _metrics(
    target: Target,
    encoder: dict[str, Any],
    results: dict[str, dict[str, Any]],
    notes: list[str],
    seconds: float,
) -> dict[str, Any]:
    """The content of `metrics.json`; `encoder` is {"url", "sha256", "description"} of the scored weights."""
    ours = results[ENCODER]
    return {
        "run": target.run,
        "encoder": encoder,
        "dataset": _dataset(target),
        "linear_probe_top1": ours.get("linear_probe_top1"),
        "knn_top1": ours.get("knn_top1"),
        "diagnostics": {k: v for k, v in ours.items() if k not in ("linear_probe_top1", "knn_top1")},
        "models": results,
        "protocol": _protocol(target),
        "config": redacted(target.cfg),
        "notes": notes,
        "seconds": seconds,
    }


# -- the stage -----------------------------------------------------------------------------------------


def run_evaluate(cfg: PipelineConfig) -> EvalSummary:
    """Score the encoder of `{root}/runs/{pretrain.run_name}` and its baselines; write metrics and report."""
    started = time.perf_counter()
    target = resolve_target(cfg)
    encoder = load_encoder(target.run, target.storage, target.device)
    weights_sha256 = target.storage.sha256(f"{target.run}/{layout.WEIGHTS}")
    networks = _networks(target, encoder)
    extractors = extractors_of(
        networks,
        target.precision,
        cfg.evaluate.pixel_size if cfg.evaluate.baselines else None,
        cfg.evaluate.features,
    )
    features, cache_notes = _features(target, extractors, weights_sha256)
    results, score_notes = _scores(target, features, list(extractors), networks)
    scored = {"url": target.run, "sha256": weights_sha256, "description": encoder.description}
    seconds = round(time.perf_counter() - started, 1)
    metrics = _metrics(target, scored, results, cache_notes + score_notes, seconds)
    figure_url, report_url = write_evaluation_reports(target.storage, target.run, metrics)
    # Last: publish, and a flow resumed after this stage, take a run with metrics.json as evaluated.
    target.storage.write_json(f"{target.run}/{layout.METRICS}", metrics)
    _track(target, metrics, [figure_url, f"{target.run}/{layout.HTML_REPORT}"])
    return EvalSummary(
        metrics=f"{target.run}/{layout.METRICS}",
        linear_probe_top1=metrics["linear_probe_top1"],
        knn_top1=metrics["knn_top1"],
        baselines={name: results[name].get("linear_probe_top1") for name in results if name != ENCODER},
        report=report_url,
        figure=figure_url,
        notes=metrics["notes"],
    )


def _track(target: Target, metrics: dict[str, Any], artifacts: list[str]) -> None:
    """The scores (at the run's last training step, beside its curves), the reports and the dataset, to
    the run's trackers."""
    summary_url = f"{target.run}/{layout.SUMMARY}"
    step = target.storage.read_json(summary_url)["steps"] if target.storage.exists(summary_url) else 0
    d = metrics["dataset"]
    with Tracker.for_run(target.cfg, target.storage, target.run) as tracker:
        tracker.log_params(redacted(target.cfg))
        tracker.set_tags(dataset_tags(d["manifest"], d["name"], d["version"]))
        tracker.log_metrics(step, evaluation_metrics(metrics))
        for url in artifacts:
            tracker.log_artifact(url)


def evaluated_run(cfg: PipelineConfig) -> dict[str, Any]:
    """The evaluation the run `pretrain.run_name` holds: its metrics.json's URL, top-1s and sha256."""
    storage = Storage.from_config(cfg.storage)
    url = f"{layout.run_url(storage, cfg.pretrain.run_name)}/{layout.METRICS}"
    if not storage.exists(url):
        raise FileNotFoundError(f"no {url}: run the evaluate stage first")
    metrics = storage.read_json(url)
    return {
        "metrics": url,
        "linear_probe_top1": metrics.get("linear_probe_top1"),
        "knn_top1": metrics.get("knn_top1"),
        "metrics_sha256": storage.sha256(url),
    }


def cli(argv: list[str] | None = None) -> int:
    args = stage_parser("lejepa-pipeline evaluate", __doc__.splitlines()[0]).parse_args(argv)
    return run_stage(lambda: run_evaluate(config_from(args)), EvaluationError)


if __name__ == "__main__":
    sys.exit(cli())
