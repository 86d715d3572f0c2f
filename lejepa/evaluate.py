"""Evaluate stage: how good the run's encoder is, beside baselines scored in the same run on the same splits.

1. Frozen features of the train and test splits (batched, no augmentation) for our encoder, the same
   architecture at random initialisation (seeded), and the raw pixels. They are cached in
   `{run}/eval/features-{split}-{key}.safetensors`, keyed by a fingerprint of the encoder weights' sha256,
   the manifest, the split and the precision (not the device), so a retry reads them back instead of
   recomputing.
2. Linear probe and kNN top-1 on the test split (`lejepa.probes`), for every feature set that has labels:
   "logistic regression on raw pixels" is the same linear probe on standardised, flattened pixels.
3. Label-free diagnostics on held-out (test) images: RankMe and the SIGReg statistic of the embeddings,
   and, when the run exported its projector, the LeJEPA loss and its parts on multi-crop views.
4. `metrics.json`, `evaluation.png` and `evaluation.md` in the run folder; the summary is printed last.

All of it runs on `evaluate.device` (a GPU when there is one): images reach it from pinned memory without
blocking, the networks run in `evaluate.precision` (bf16 autocast on a GPU by default), and their features
come back to the CPU as float32 once a split is done.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import PipelineConfig, redacted
from lejepa.data import eval_loader
from lejepa.export import DESCRIPTION, PROJECTOR, WEIGHTS, FrozenEncoder, load_encoder
from lejepa.loss import lejepa_loss
from lejepa.model import Encoder, create_backbone
from lejepa.precision import resolve_precision
from lejepa.probes import (
    effective_rank,
    knn_classify,
    linear_probe,
    sigreg_statistic,
    standardised,
    top1,
)
from lejepa.report import FIGURE, REPORT, write_figure, write_html_report, write_report
from lejepa.shard import ShardManifest, locate_manifest
from lejepa.sigreg import SIGReg
from lejepa.storage import Storage
from lejepa.views import MultiCropViews

METRICS = "metrics.json"
FEATURES_FORMAT = 2  # 2: the random-init baseline's BatchNorm is calibrated
ENCODER, RANDOM_INIT, RAW_PIXELS = "encoder", "random_init", "raw_pixels"


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


# -- device and precision ----------------------------------------------------------------------------------


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


def on_device(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """The (images, labels) batches with the images on `device`; the labels stay on the CPU.

    On CUDA the images are copied from pinned memory without blocking, so the copy overlaps the work
    already queued on the GPU and the loop never waits for it.
    """
    for images, labels in batches:
        if device.type == "cuda" and not images.is_pinned():
            images = images.pin_memory()
        yield images.to(device, non_blocking=True), labels


# -- features ----------------------------------------------------------------------------------------------


def sha256_of(storage: Storage, url: str) -> str:
    """The sha256 of a file (a URL on `storage`, or a local path), streamed."""
    digest = hashlib.sha256()
    with storage.open(url, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_features(images: Tensor, max_side: int) -> Tensor:
    """Flattened uint8 pixels, area-downsampled first when the images are larger than `max_side`."""
    if max(images.shape[-2:]) > max_side:
        small = F.interpolate(images.float(), size=(max_side, max_side), mode="area")
        images = small.round().clamp(0, 255).to(torch.uint8)
    return images.flatten(1)


def extract_features(
    extractors: dict[str, Callable[[Tensor], Tensor]],
    batches: Iterable[tuple[Tensor, Tensor]],
    total: int | None = None,
    desc: str = "features",
) -> dict[str, Tensor]:
    """Run every extractor on each batch of (uint8 images, labels): {name: (N, D)} plus "labels" (N,).

    The images may be on any device. Their features stay there until the last batch, so the loop queues
    work without waiting for the device (a copy back per batch would); they are returned on the CPU.
    """
    parts: dict[str, list[Tensor]] = {name: [] for name in [*extractors, "labels"]}
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
    with torch.no_grad(), bar:
        for images, labels in batches:
            for name, extract in extractors.items():
                parts[name].append(extract(images))
            parts["labels"].append(labels.long())
            bar.update(len(labels))
    return {name: torch.cat([chunk.cpu() for chunk in chunks]) for name, chunks in parts.items() if chunks}


def in_precision(network: Callable[[Tensor], Tensor], precision: str) -> Callable[[Tensor], Tensor]:
    """`network` run under bfloat16 autocast (on the images' device) for precision "bf16", float32 features
    out; for "fp32" the network as is."""
    if precision == "fp32":
        return network

    def extract(images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return network(images).float()

    return extract


def cached_features(
    storage: Storage, url: str, compute: Callable[[], dict[str, Tensor]]
) -> tuple[dict[str, Tensor], bool]:
    """The tensors stored at `url` (safetensors), or `compute()`'s, written there first; (tensors, hit)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "features.safetensors"
        if storage.exists(url):
            storage.get_file(url, local)
            return load_file(str(local)), True
        tensors = {name: t.contiguous() for name, t in compute().items()}
        save_file(tensors, str(local), metadata={"format": str(FEATURES_FORMAT)})
        storage.put_file(local, url)
        return tensors, False


def features_key(
    weights_sha256: str,
    manifest: ShardManifest,
    split: str,
    extractors: Iterable[str],
    precision: str,
    cfg: PipelineConfig,
) -> str:
    """Cache key of a split's features: what they depend on, with the resolved precision (fp32 or bf16).

    Not the device: the same networks give the same features on a CPU and a GPU, up to rounding.
    """
    e = cfg.evaluate
    fields = [
        FEATURES_FORMAT,
        weights_sha256,
        manifest.url,
        manifest.version,
        split,
        sorted(extractors),
        cfg.seed,
        e.pixel_size,
        precision,
        # the random-init baseline's BatchNorm statistics come from these images
        e.train_split,
        e.calibration_samples,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def random_init_encoder(description: dict[str, Any], seed: int) -> FrozenEncoder:
    """The exported architecture at its seeded initialisation (drawn on the CPU: the same on any device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(
            description["backbone"],
            in_chans=description["in_chans"],
            img_size=description["img_size"],
            small_input=description["small_input"],
            **description["backbone_kwargs"],
        )
    return FrozenEncoder(backbone, description)


def calibrate_batchnorm(frozen: FrozenEncoder, images: Tensor, batch_size: int) -> None:
    """Set the BatchNorm running statistics of `frozen` to the batch statistics of `images` (on the device of
    `frozen`), in place.

    At initialisation they are 0 and 1, which no activation of a real image has, so a random network in
    eval mode collapses its features (RankMe ~4 on Fashion-MNIST) and would be a straw-man baseline. The
    weights stay random; only what BatchNorm assumes about its input is measured (an exact average over
    the batches of `images`, not a moving one).
    """
    norms = [m for m in frozen.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    if norms and len(images):
        frozen.train()
        for batch in images.split(batch_size):
            frozen(batch)
        frozen.eval()


# -- diagnostics --------------------------------------------------------------------------------------


def _full_encoder(frozen: FrozenEncoder, projector_state: dict[str, Tensor] | None) -> Encoder:
    """Backbone + projector with the exported weights (the projector random when there is none)."""
    d, p = frozen.description, frozen.description["projector"]
    encoder = Encoder(
        d["backbone"],
        in_chans=d["in_chans"],
        img_size=d["img_size"],
        proj_dim=p["proj_dim"],
        proj_hidden_dim=p["proj_hidden_dim"],
        proj_layers=p["proj_layers"],
        small_input=d["small_input"],
        **d["backbone_kwargs"],
    )
    encoder.backbone.load_state_dict(frozen.backbone.state_dict())
    if projector_state is not None:
        encoder.projector.load_state_dict(projector_state)
    return encoder.eval()


def heldout_lejepa_loss(
    encoder: Encoder, images: Tensor, views: MultiCropViews, cfg: PipelineConfig, batch_size: int
) -> dict[str, float]:
    """The LeJEPA loss (and its parts) of held-out images under the training views, seeded, averaged over
    batches of the training batch size (SIGReg's value depends on the batch size).

    Runs where `encoder`, `images` and `views` are; the views and SIGReg's slices are drawn by a generator
    on that device, so each device's number is reproducible, but a CPU and a GPU draw different views.
    """
    sigreg = SIGReg(cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, seed=cfg.seed)
    generator = torch.Generator(device=images.device).manual_seed(cfg.seed)
    # Summed on the device: reading each batch's loss would wait for the device every batch.
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    batches = images.split(batch_size)
    with torch.no_grad():
        for batch in batches:
            global_views, local_views = views(batch, generator)
            _, projections = encoder.forward_views(global_views, local_views)
            loss = lejepa_loss(projections, global_views.shape[0], sigreg, cfg.loss.lamb)
            sums += torch.stack([loss.total, loss.prediction, loss.sigreg]).double()
    total, prediction, regulariser = (sums / len(batches)).tolist()
    return {"lejepa_loss": total, "lejepa_prediction": prediction, "lejepa_sigreg": regulariser}


def heldout_losses(
    cfg: PipelineConfig,
    storage: Storage,
    run_url: str,
    manifest: ShardManifest,
    split: str,
    encoders: dict[str, FrozenEncoder],
    device: torch.device,
) -> dict[str, dict[str, float]] | None:
    """The held-out LeJEPA loss of each encoder with the run's projector (the random-init encoder gets a
    random one, as the same architecture at initialisation), on `device`; None when the run exported no
    projector."""
    projector_url = f"{run_url}/{PROJECTOR}"
    description = encoders[ENCODER].description
    if "projector" not in description or not storage.exists(projector_url):
        return None
    e = cfg.evaluate
    heldout = _first_images(manifest, storage, split, e.diagnostic_samples, e.batch_size).to(device)
    views = MultiCropViews.from_config(
        cfg.views, manifest.image_size, description["in_chans"], description["mean"], description["std"]
    ).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        storage.get_file(projector_url, Path(tmp) / PROJECTOR)
        projector_state = load_file(str(Path(tmp) / PROJECTOR))
    losses = {}
    for name, frozen in encoders.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _full_encoder(frozen, projector_state if name == ENCODER else None).to(device)
        losses[name] = heldout_lejepa_loss(model, heldout, views, cfg, cfg.pretrain.batch_size)
    return losses


def _first_images(manifest: ShardManifest, storage: Storage, split: str, n: int, batch_size: int) -> Tensor:
    images: list[Tensor] = []
    for batch, _ in eval_loader(manifest, storage, split, batch_size=batch_size):
        images.append(batch)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


def embedding_diagnostics(embeddings: Tensor, cfg: PipelineConfig) -> dict[str, float]:
    return {
        "rankme": effective_rank(embeddings),
        "sigreg": sigreg_statistic(embeddings, cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, cfg.seed),
    }


# -- probes ---------------------------------------------------------------------------------------------


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


def _test_split(cfg: PipelineConfig, manifest: ShardManifest) -> str:
    split = cfg.evaluate.test_split or ("test" if "test" in manifest.splits else "val")
    for name, value in (("train_split", cfg.evaluate.train_split), ("test_split", split)):
        if value not in manifest.splits:
            raise EvaluationError(
                f"evaluate.{name}: dataset {manifest.name}/{manifest.version} has no split '{value}' "
                f"(has {sorted(manifest.splits)})"
            )
    return split


def _read_history(storage: Storage, run_url: str) -> list[dict[str, Any]]:
    url = f"{run_url}/metrics.jsonl"
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def run_manifest(cfg: PipelineConfig, storage: Storage, run_url: str) -> str:
    """The manifest to score on: `data.manifest` when set; else the one the run recorded that it trained on
    (its summary.json), so a dataset sharded since never replaces it; else, for a run from before that record,
    the one `locate_manifest` finds."""
    summary_url = f"{run_url}/summary.json"
    if not cfg.data.manifest and storage.exists(summary_url):
        recorded = storage.read_json(summary_url).get("manifest")
        if recorded:
            return recorded
    return locate_manifest(cfg, storage)


def run_evaluate(cfg: PipelineConfig) -> EvalSummary:
    """Score the encoder of `{root}/runs/{pretrain.run_name}` and its baselines; write metrics and report."""
    e = cfg.evaluate
    started = time.perf_counter()
    device = resolve_device(e.device)  # before anything is read or written
    precision = resolve_precision(e.precision, device.type)
    storage = Storage.from_config(cfg.storage)
    run_url = storage.url("runs", cfg.pretrain.run_name)
    if not storage.exists(f"{run_url}/{DESCRIPTION}"):
        raise EvaluationError(
            f"no exported encoder in {run_url}: run `lejepa-pipeline pretrain` with pretrain.run_name="
            f"{cfg.pretrain.run_name} first"
        )
    manifest_url = run_manifest(cfg, storage, run_url)
    manifest = ShardManifest.load(storage, manifest_url)
    test_split = _test_split(cfg, manifest)
    splits = {"train": e.train_split, "test": test_split}

    encoder = load_encoder(run_url, storage, device)
    description = encoder.description
    weights_sha256 = sha256_of(storage, f"{run_url}/{WEIGHTS}")
    networks = {ENCODER: encoder}
    if e.baselines:
        networks[RANDOM_INIT] = random_init_encoder(description, cfg.seed).to(device)
        calibration = _first_images(manifest, storage, e.train_split, e.calibration_samples, e.batch_size)
        calibrate_batchnorm(networks[RANDOM_INIT], calibration.to(device), e.batch_size)
    extractors: dict[str, Callable[[Tensor], Tensor]] = {
        name: in_precision(network, precision) for name, network in networks.items()
    }
    if e.baselines:
        extractors[RAW_PIXELS] = lambda images: pixel_features(images, e.pixel_size)

    features: dict[str, dict[str, Tensor]] = {}
    notes: list[str] = []
    for role, split in splits.items():
        key = features_key(weights_sha256, manifest, split, extractors, precision, cfg)
        url = f"{run_url}/eval/features-{split}-{key}.safetensors"

        def compute(split: str = split) -> dict[str, Tensor]:
            batches = eval_loader(
                manifest,
                storage,
                split,
                batch_size=e.batch_size,
                num_workers=e.num_workers,
                pin_memory=device.type == "cuda",
            )
            return extract_features(
                extractors, on_device(batches, device), manifest.num_samples[split], f"features {split}"
            )

        features[role], hit = cached_features(storage, url, compute)
        if hit:
            notes.append(f"{split} features read from the cache {url}")

    labelled = (
        manifest.num_classes > 0
        and bool((features["train"]["labels"] >= 0).any())
        and bool((features["test"]["labels"] >= 0).any())
    )
    num_classes = manifest.num_classes
    results = {name: model_scores(name, features, labelled, num_classes, cfg, device) for name in extractors}
    if not labelled:
        notes.append(
            "unlabelled data: probes skipped (linear probe, kNN); the label-free diagnostics still ran"
        )

    losses = heldout_losses(cfg, storage, run_url, manifest, test_split, networks, device)
    if losses is None:
        notes.append(
            f"LeJEPA loss diagnostic skipped: the run has no {PROJECTOR} (exported before projectors were)"
        )
    for name, values in (losses or {}).items():
        results[name].update(values)

    ours = results[ENCODER]
    metrics = {
        "run": run_url,
        "encoder": {"url": run_url, "sha256": weights_sha256, "description": description},
        "dataset": {
            "name": manifest.name,
            "version": manifest.version,
            "manifest": manifest_url,
            "fingerprint": manifest.source.get("fingerprint"),
            # A split's fingerprint names its samples: the publish gate compares top-1 on equal test sets.
            "splits": {
                role: {
                    "split": s,
                    "num_samples": manifest.num_samples[s],
                    "fingerprint": manifest.splits[s].fingerprint,
                }
                for role, s in splits.items()
            },
            "num_classes": num_classes,
        },
        "linear_probe_top1": ours.get("linear_probe_top1"),
        "knn_top1": ours.get("knn_top1"),
        "diagnostics": {k: v for k, v in ours.items() if k not in ("linear_probe_top1", "knn_top1")},
        "models": results,
        "protocol": {
            "linear_probe": (
                f"standardised features -> LayerNorm + Linear, AdamW (weight decay {e.probe_weight_decay}), "
                f"lr {e.probe_lr}, "
                f"{e.probe_epochs} epochs of batch {e.probe_batch_size}, "
                f"warm-up {e.probe_warmup_fraction} + cosine"
            ),
            "features": f"one deterministic view per image, networks in {precision} on {device.type}",
            "knn": f"cosine similarity, k={e.knn_k}, temperature {e.knn_temperature}",
            "raw_pixels": "both probes on standardised, flattened pixels (linear probe: logistic regression)",
            "diagnostics": f"first {e.diagnostic_samples} samples of the {test_split} split",
        },
        "config": redacted(cfg),
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    figure_url, report_url = f"{run_url}/{FIGURE}", f"{run_url}/{REPORT}"
    history = _read_history(storage, run_url)
    with tempfile.TemporaryDirectory() as tmp:
        write_figure(history, metrics, Path(tmp) / FIGURE)
        storage.put_file(Path(tmp) / FIGURE, figure_url)
    storage.write_bytes(report_url, write_report(metrics, FIGURE).encode())
    write_html_report(storage, run_url, metrics)
    storage.write_json(f"{run_url}/{METRICS}", metrics)
    return EvalSummary(
        metrics=f"{run_url}/{METRICS}",
        linear_probe_top1=metrics["linear_probe_top1"],
        knn_top1=metrics["knn_top1"],
        baselines={name: results[name].get("linear_probe_top1") for name in results if name != ENCODER},
        report=report_url,
        figure=figure_url,
        notes=notes,
    )


def cli(argv: list[str] | None = None) -> int:
    args = stage_parser("lejepa-pipeline evaluate", __doc__.splitlines()[0]).parse_args(argv)
    return run_stage(lambda: run_evaluate(config_from(args)), EvaluationError)


if __name__ == "__main__":
    sys.exit(cli())
