"""The evaluation's frozen features: what each model makes of a split's images, and their cache.

The feature sets, named by the model they come from: our encoder, the same architecture at its seeded
initialisation (its BatchNorm calibrated on training images), and the raw pixels. Networks run in the
evaluation's precision on its device; the images reach it from pinned memory without blocking, and the
features come back to the CPU as float32 once a split is done.

A split's features are cached in the run folder (`lejepa.store.layout.features_url`), keyed by what they
depend on (`features_key`): the encoder weights' sha256, the manifest, the split, the precision and the
read-out (`evaluate.features`), not the device. So a retry reads them back instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from lejepa.config import PipelineConfig
from lejepa.data.manifest import ShardManifest
from lejepa.data.stream import eval_loader
from lejepa.objective.views import eval_view
from lejepa.store.storage import Storage
from lejepa.train.export import FrozenEncoder, rebuild_backbone

FEATURES_FORMAT = 2  # 2: the random-init baseline's BatchNorm is calibrated
ENCODER, RANDOM_INIT, RAW_PIXELS = "encoder", "random_init", "raw_pixels"

Extractor = Callable[[Tensor], Tensor]
"""uint8 images (B, C, H, W) on a device -> features (B, D) there."""


# -- extraction --------------------------------------------------------------------------------------------


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


def pixel_features(images: Tensor, max_side: int) -> Tensor:
    """Flattened uint8 pixels, area-downsampled first when the images are larger than `max_side`."""
    if max(images.shape[-2:]) > max_side:
        small = F.interpolate(images.float(), size=(max_side, max_side), mode="area")
        images = small.round().clamp(0, 255).to(torch.uint8)
    return images.flatten(1)


def in_precision(network: Extractor, precision: str) -> Extractor:
    """`network` run under bfloat16 autocast (on the images' device) for precision "bf16", float32 features
    out; for "fp32" the network as is."""
    if precision == "fp32":
        return network

    def extract(images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return network(images).float()

    return extract


def reads_blocks(backbone: torch.nn.Module) -> bool:
    """Whether the backbone is a transformer whose last blocks the `last2` read-out takes (a timm ViT-like
    model: token blocks and `forward_intermediates`); a CNN's read-out is its pooled last stage."""
    return hasattr(backbone, "forward_intermediates") and hasattr(backbone, "num_prefix_tokens")


def read_out(network: FrozenEncoder, features: str) -> Extractor:
    """What the probes read of `network` (`evaluate.features`): its pooled output (last), or for a ViT
    the class tokens of its last two blocks through the final norm, concatenated (last2; the mean patch
    token where the model has no class token). A CNN's last2 is its pooled last stage: the same as last."""
    if features == "last" or not reads_blocks(network.backbone):
        return network

    @torch.no_grad()
    def last_two_blocks(images: Tensor) -> Tensor:
        view = eval_view(images, network.img_size, network.mean, network.std)
        blocks = network.backbone.forward_intermediates(
            view, indices=2, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        if not network.backbone.num_prefix_tokens:  # no class token: timm returns the patch tokens alone
            return torch.cat([patches.mean(1) for patches in blocks], dim=1)
        # (patch tokens, prefix tokens) per block; the class token leads the prefix (registers follow it).
        return torch.cat([prefix[:, 0] for _, prefix in blocks], dim=1)

    return last_two_blocks


def extractors_of(
    networks: dict[str, FrozenEncoder], precision: str, pixel_size: int | None, features: str = "last"
) -> dict[str, Extractor]:
    """Each network read out as `features` says, in `precision`; then the raw pixels (at most `pixel_size` a
    side) unless it is None."""
    extractors = {
        name: in_precision(read_out(network, features), precision) for name, network in networks.items()
    }
    if pixel_size is not None:
        extractors[RAW_PIXELS] = lambda images: pixel_features(images, pixel_size)
    return extractors


def extract_features(
    extractors: dict[str, Extractor],
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


def split_features(
    extractors: dict[str, Extractor],
    manifest: ShardManifest,
    storage: Storage,
    split: str,
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> dict[str, Tensor]:
    """Every extractor's features of every image of `split` (no augmentation), with the labels."""
    batches = eval_loader(
        manifest,
        storage,
        split,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    return extract_features(
        extractors, on_device(batches, device), manifest.num_samples[split], f"features {split}"
    )


def first_images(manifest: ShardManifest, storage: Storage, split: str, n: int, batch_size: int) -> Tensor:
    """The first `n` images of `split` (uint8, on the CPU), in the evaluation's fixed order."""
    images: list[Tensor] = []
    for batch, _ in eval_loader(manifest, storage, split, batch_size=batch_size):
        images.append(batch)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


# -- the cache ---------------------------------------------------------------------------------------------


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
    if e.features != "last":  # so caches written before the read-out was a choice keep their key
        fields.append(e.features)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


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


# -- the random-init baseline ------------------------------------------------------------------------------


def random_init_encoder(description: dict[str, Any], seed: int) -> FrozenEncoder:
    """The exported architecture at its seeded initialisation (drawn on the CPU: the same on any device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = rebuild_backbone(description)
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
