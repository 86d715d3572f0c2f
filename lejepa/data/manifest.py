"""A dataset's manifest: the schema every stage reads, and how a stage finds the manifest it should read.

The shard stage writes one `ShardManifest` per dataset version, last, beside the shards it lists (its
commit point: readers trust only the shards a manifest lists), and then moves the dataset's `latest`
pointer to it; `lejepa.store.layout` says where both live. A version derives from the source's fingerprint and
the sharding parameters (`dataset_version`), so the same input always finds the same manifest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from lejepa.config import DataConfig, PipelineConfig
from lejepa.data.sources import open_source
from lejepa.store import layout
from lejepa.store.errors import DataError
from lejepa.store.storage import Storage

# 2: a sample's split is a threshold on a seeded hash of its own id (1 cut the hash order at a count, so
# adding files moved others across the boundaries); the version hash includes it.
FORMAT_VERSION = 2


# -- the schema ------------------------------------------------------------------------------------------


class ShardEntry(BaseModel):
    url: str
    split: str
    num_samples: int
    num_bytes: int
    sha256: str


class RejectedSample(BaseModel):
    id: str
    reason: str


class ImageStats(BaseModel):
    """What the loaders decode to, and how to normalise it."""

    size: tuple[int, int]
    """(height, width) every image is resized/cropped to by the loaders."""
    mode: str
    """PIL mode the loaders convert to: L (1 channel) or RGB (3 channels)."""
    mean: list[float]
    """Per-channel mean of the train split, pixels scaled to [0, 1]."""
    std: list[float]
    sizes: dict[str, int]
    """How many source images had each size, `HxW` (the 20 most common)."""
    modes: dict[str, int]
    """How many source images had each PIL mode."""

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


class SplitInfo(BaseModel):
    num_samples: int
    num_shards: int
    fingerprint: str | None = None
    """A hash of the split's sorted (id, label) pairs and the dataset's name: equal fingerprints, the same
    samples (None in manifests written before format 2)."""


class ShardManifest(BaseModel):
    format: int = FORMAT_VERSION
    name: str
    version: str
    url: str
    """Where this manifest lives; shard URLs are absolute."""
    created: str
    code_version: str
    source: dict[str, Any]
    """kind, path and fingerprint of the source."""
    params: dict[str, Any]
    """The sharding parameters that, with the fingerprint, determine `version`."""
    class_names: list[str] | None
    splits: dict[str, SplitInfo]
    image: ImageStats
    shards: list[ShardEntry]
    rejected: list[RejectedSample]

    @classmethod
    def load(cls, storage: Storage, url: str) -> ShardManifest:
        try:
            return cls.model_validate(storage.read_json(url))
        except FileNotFoundError:
            raise DataError(f"no shard manifest at {url}: run `lejepa-pipeline shard` first") from None

    def shards_for(self, split: str) -> list[ShardEntry]:
        if split not in self.splits:
            raise DataError(
                f"dataset {self.name}/{self.version} has no split '{split}' (has {list(self.splits)})"
            )
        return [s for s in self.shards if s.split == split]

    # Shortcuts for the training and evaluation stages.
    @property
    def num_samples(self) -> dict[str, int]:
        return {split: info.num_samples for split, info in self.splits.items()}

    @property
    def classes(self) -> list[str]:
        return list(self.class_names or [])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.image.channels

    @property
    def longer_side(self) -> int:
        """The longer side of the images the loaders yield: their side, as they are square in practice."""
        return max(self.image.size)

    @property
    def mean(self) -> list[float]:
        return self.image.mean

    @property
    def std(self) -> list[float]:
        return self.image.std


# -- which version a config names ------------------------------------------------------------------------


def dataset_name(data: DataConfig) -> str:
    """The dataset's name in the store: `data.name`, else the source's name."""
    return data.name or data.source


def sharding_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The parameters that, with the source's fingerprint, determine a dataset version's content."""
    d, s = cfg.data, cfg.shard
    return {
        "format": FORMAT_VERSION,
        "samples_per_shard": s.samples_per_shard,
        "png_compress_level": s.png_compress_level,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "split_seed": d.split_seed,
        "image_size": d.image_size,
        "mode": d.mode,
        "limit": d.limit,
    }


def dataset_version(cfg: PipelineConfig, fingerprint: str) -> str:
    blob = json.dumps([fingerprint, sharding_params(cfg)], sort_keys=True).encode()
    return "v-" + hashlib.sha256(blob).hexdigest()[:12]


# -- finding a manifest ----------------------------------------------------------------------------------


def manifest_url_for(
    cfg: PipelineConfig, storage: Storage | None = None, fingerprint: str | None = None
) -> str:
    """Where the manifest of exactly `cfg`'s dataset lives, committed or not.

    `fingerprint` is the source's; when None the source is opened and fingerprinted (no sample is listed).
    """
    storage = storage or Storage.from_config(cfg.storage)
    fingerprint = fingerprint or open_source(cfg.data, storage).fingerprint()
    return layout.manifest_url(storage, dataset_name(cfg.data), dataset_version(cfg, fingerprint))


def latest_manifest_url(storage: Storage, name: str) -> str:
    """The manifest the last successful shard run of dataset `name` committed."""
    try:
        return storage.read_json(layout.dataset_latest_url(storage, name))["manifest"]
    except FileNotFoundError:
        raise DataError(f"no dataset '{name}' in {storage.root}: run `lejepa-pipeline shard` first") from None


def locate_manifest(cfg: PipelineConfig, storage: Storage | None = None) -> str:
    """The manifest a later stage should read: `data.manifest` when set (exactly that one, never resolved
    again); else `cfg`'s exact dataset when its source is reachable here and sharded; else the latest one
    committed under the dataset's name (training nodes may lack the source).
    """
    storage = storage or Storage.from_config(cfg.storage)
    if cfg.data.manifest:
        if not storage.exists(cfg.data.manifest):
            raise DataError(
                f"data.manifest: no shard manifest at {cfg.data.manifest}: set it to a committed "
                f"{layout.MANIFEST}, or unset it to use the dataset of the data section"
            )
        return cfg.data.manifest
    try:
        url = manifest_url_for(cfg, storage)
        if storage.exists(url):
            return url
    except DataError:
        pass
    return latest_manifest_url(storage, dataset_name(cfg.data))
