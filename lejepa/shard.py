"""Shard stage: any image source to WebDataset tar shards on object storage, committed by a manifest.

Layout: `{root}/datasets/{name}/{version}/{split}-{000000}.tar`, `manifest.json` beside the shards, and
`{root}/datasets/{name}/latest.json` pointing at the newest manifest. Each sample is `key.png|jpg|...`
(the source's bytes when already encoded, PNG for raw pixels), `key.cls` when labelled, `key.json`.

The manifest is written last and is the commit point: readers only trust shards a manifest lists, so a
crash never exposes a partial dataset. `version` derives from the source fingerprint and the sharding
parameters, so running again on the same input finds the manifest and returns at once.

A sample's split depends on its own id alone (`split_of`: a seeded hash below a threshold), so adding or
removing files never moves another file between train, val and test. The manifest records a fingerprint of
each split's samples, which tells the publish gate whether two models were scored on the same test set.

The work is a deterministic partition of the samples into groups of `shard.samples_per_shard`: group i
becomes one shard, written independently by `write_shard_group(plan, i)` (one Prefect task per group in
the orchestrated pipeline; a local process pool here).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO

import numpy as np
from pydantic import BaseModel

import lejepa
from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import DataConfig, PipelineConfig
from lejepa.lease import Lease
from lejepa.sources import DataError, Item, Payload, Rejection, Source, open_source
from lejepa.storage import TMP_PREFIX, Storage

SPLITS = ("train", "val", "test")
# 2: a sample's split is a threshold on a seeded hash of its own id (1 cut the hash order at a count, so
# adding files moved others across the boundaries); the version hash includes it.
FORMAT_VERSION = 2
# Fault injection for the crash-safety test: SIGKILL this process after N shards are written.
CRASH_AFTER_ENV = "LEJEPA_SHARD_CRASH_AFTER"
COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


# -- manifest --------------------------------------------------------------------------------------------


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
    def image_size(self) -> int:
        """The side of the (square) images the loaders yield; the longer side if they are not square."""
        return max(self.image.size)

    @property
    def mean(self) -> list[float]:
        return self.image.mean

    @property
    def std(self) -> list[float]:
        return self.image.std


class ShardSummary(BaseModel):
    manifest: str
    version: str
    num_samples: dict[str, int]
    num_shards: int
    rejected: int
    up_to_date: bool
    seconds: float = 0.0
    images_per_s: float = 0.0


# -- planning --------------------------------------------------------------------------------------------


@dataclass
class ShardGroup:
    split: str
    index: int
    """Shard number inside its split."""
    items: list[tuple[int, Item]]
    """(sample number in the source listing, item); the number becomes the sample's key."""

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class ShardPlan:
    name: str
    version: str
    storage: Storage
    source: Source
    params: dict[str, Any]
    fingerprint: str
    groups: list[ShardGroup]
    class_names: list[str] | None
    listing_rejects: list[Rejection] = field(default_factory=list)

    @property
    def dataset_url(self) -> str:
        return self.storage.url("datasets", self.name, self.version)

    @property
    def manifest_url(self) -> str:
        return posixpath.join(self.dataset_url, "manifest.json")

    @property
    def num_items(self) -> int:
        return sum(len(g.items) for g in self.groups)


def _params(cfg: PipelineConfig) -> dict[str, Any]:
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


def _rank(seed: int, item_id: str) -> bytes:
    # A seeded hash of the sample's identity: it places the sample in a split and orders the shards.
    return hashlib.sha256(f"{seed}:{item_id}".encode()).digest()


def split_of(item: Item, data: DataConfig, has_test: bool) -> str:
    """The split of one sample, decided by its own id alone: its seeded hash as a number in [0, 1) is `val`
    below val_fraction, then `test` below val_fraction + test_fraction (for sources without a test split of
    their own), else `train`. Files that come and go never move another one across a boundary."""
    if item.split == "test":
        return "test"
    position = int.from_bytes(_rank(data.split_seed, item.id)[:8], "big") / 2**64
    if position < data.val_fraction:
        return "val"
    if not has_test and position < data.val_fraction + data.test_fraction:
        return "test"
    return "train"


def _assign_splits(
    items: list[Item], cfg: PipelineConfig, sequential: bool
) -> dict[str, list[tuple[int, Item]]]:
    d = cfg.data
    has_test = any(it.split == "test" for it in items)
    out: dict[str, list[tuple[int, Item]]] = {s: [] for s in SPLITS}
    for number, item in enumerate(items):
        out[split_of(item, d, has_test)].append((number, item))
    if not sequential:  # tar sources keep the source order, so each shard reads few input tars
        for members in out.values():
            members.sort(key=lambda x: _rank(d.split_seed, x[1].id))
    return {s: m for s, m in out.items() if m}


def split_fingerprint(dataset: str, items: Sequence[Item]) -> str:
    """What makes two splits the same: the dataset's name and its samples' sorted (id, label) pairs."""
    blob = json.dumps([dataset, sorted([item.id, item.label] for item in items)]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _version(cfg: PipelineConfig, fingerprint: str) -> str:
    blob = json.dumps([fingerprint, _params(cfg)], sort_keys=True).encode()
    return "v-" + hashlib.sha256(blob).hexdigest()[:12]


def _manifest_url(storage: Storage, cfg: PipelineConfig, version: str) -> str:
    return storage.url("datasets", cfg.data.name or cfg.data.source, version, "manifest.json")


def plan_shards(
    cfg: PipelineConfig,
    storage: Storage | None = None,
    source: Source | None = None,
    fingerprint: str | None = None,
) -> ShardPlan:
    """Fingerprint and list the source, assign splits, and cut the samples into shard groups.

    Deterministic: every call with the same config and source gives the same groups, so a task runner
    can plan once per task and write only its own group.
    """
    storage = storage or Storage.from_config(cfg.storage)
    source = source or open_source(cfg.data, storage)
    fingerprint = fingerprint or source.fingerprint()
    items, rejects = source.items()
    if not items:
        where = getattr(getattr(source, "storage", None), "root", source.kind)
        raise DataError(f"{source.kind}: no images found in {where}")
    groups = []
    n = cfg.shard.samples_per_shard
    for split, members in _assign_splits(items, cfg, source.sequential).items():
        groups += [ShardGroup(split, i // n, members[i : i + n]) for i in range(0, len(members), n)]
    return ShardPlan(
        name=cfg.data.name or cfg.data.source,
        version=_version(cfg, fingerprint),
        storage=storage,
        source=source,
        params=_params(cfg),
        fingerprint=fingerprint,
        groups=groups,
        class_names=source.class_names(),
        listing_rejects=rejects,
    )


def manifest_url_for(cfg: PipelineConfig, storage: Storage | None = None) -> str:
    """Where the manifest of exactly `cfg`'s dataset lives (fingerprints the source; lists no samples)."""
    storage = storage or Storage.from_config(cfg.storage)
    return _manifest_url(storage, cfg, _version(cfg, open_source(cfg.data, storage).fingerprint()))


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
                "manifest.json, or unset it to use the dataset of the data section"
            )
        return cfg.data.manifest
    try:
        url = manifest_url_for(cfg, storage)
        if storage.exists(url):
            return url
    except DataError:
        pass
    return latest_manifest_url(storage, cfg.data.name or cfg.data.source)


def latest_manifest_url(storage: Storage, name: str) -> str:
    """The manifest the last successful shard run of dataset `name` committed."""
    pointer = storage.url("datasets", name, "latest.json")
    try:
        return storage.read_json(pointer)["manifest"]
    except FileNotFoundError:
        raise DataError(f"no dataset '{name}' in {storage.root}: run `lejepa-pipeline shard` first") from None


# -- writing one group -----------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.num_bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.f.write(data)


@dataclass
class GroupResult:
    """A written shard plus what the manifest needs to know about its samples."""

    entry: ShardEntry | None
    rejected: list[RejectedSample]
    sizes: Counter
    modes: Counter
    histograms: dict[int, np.ndarray]
    """channels -> (channels, 256) counts of each pixel value, per channel (exact, cheap statistics)."""


def _header_template() -> bytes:
    header = bytearray(512)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[136:148] = b"00000000000\0"  # mtime 0
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header)


_TAR_HEADER = _header_template()
_TAR_HEADER_SUM = sum(_TAR_HEADER)


def _tar_member(name: str, data: bytes) -> bytes:
    """A USTAR member with fixed metadata (mode 0444, mtime 0), so equal input gives equal shards.

    Written by hand because tarfile's header code costs more than encoding a 28x28 PNG.
    """
    encoded, size = name.encode(), b"%011o\0" % len(data)
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(_TAR_HEADER)
    header[: len(encoded)] = encoded
    header[124:136] = size
    header[148:156] = b"%06o\0 " % (_TAR_HEADER_SUM + sum(encoded) + sum(size))
    return bytes(header) + data + bytes(-len(data) % 512)


def _encode_png(pixels: np.ndarray, level: int) -> bytes:
    """Lossless PNG of (H, W) grey or (H, W, 3) RGB uint8 pixels, without PIL's per-call overhead."""
    h, w = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = np.zeros((h, 1 + pixels[0].size), dtype=np.uint8)  # filter byte 0 ("none") before each row
    rows[:, 1:] = pixels.reshape(h, -1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def _decoded(payload: Payload, level: int, target_mode: str) -> tuple[bytes, str, np.ndarray, str, tuple]:
    """(bytes to store, extension, pixels for statistics, PIL mode, (h, w)); raises if undecodable."""
    from PIL import Image

    if isinstance(payload, np.ndarray):
        mode = "L" if payload.ndim == 2 else "RGB"
        return _encode_png(payload, level), "png", payload, mode, payload.shape[:2]
    data, ext = payload
    image = Image.open(io.BytesIO(data))
    image.load()
    fmt = (image.format or ext or "png").lower()
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
    colour = image.mode in COLOUR_MODES and target_mode != "L"
    pixels = np.asarray(image.convert("RGB" if colour else "L"))
    return data, ext, pixels, image.mode, (image.height, image.width)


def write_shard_group(plan: ShardPlan, index: int) -> GroupResult:
    """Read, validate and write group `index` as one shard; unreadable samples are counted, not fatal.

    Independent of every other group (one task each in the orchestrated pipeline). A group without a
    single valid image writes nothing and returns `entry=None`.
    """
    try:
        return _write_group(plan, index)
    except _EmptyGroup as empty:
        return empty.result


def _write_group(plan: ShardPlan, index: int) -> GroupResult:
    group = plan.groups[index]
    url = posixpath.join(plan.dataset_url, group.name)
    numbers = {item: n for n, item in group.items}
    result = GroupResult(None, [], Counter(), Counter(), {})
    level, target_mode = plan.params["png_compress_level"], plan.params["mode"]
    count = 0
    with plan.storage.writer(url) as raw:
        out = _HashingWriter(raw)
        for item, payload in plan.source.read([it for _, it in group.items]):
            try:
                if isinstance(payload, Exception):
                    raise payload
                data, ext, pixels, mode, (h, w) = _decoded(payload, level, target_mode)
            except Exception as exc:  # any decoder failure means a bad file, never a bad run
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                result.rejected.append(RejectedSample(id=item.id, reason=reason))
                continue
            key = f"{numbers[item]:08d}"
            meta = json.dumps({"id": item.id, "size": [h, w], "mode": mode}).encode()
            label = _tar_member(f"{key}.cls", str(item.label).encode()) if item.label >= 0 else b""
            out.write(_tar_member(f"{key}.{ext}", data) + label + _tar_member(f"{key}.json", meta))
            count += 1
            result.sizes[f"{h}x{w}"] += 1
            result.modes[mode] += 1
            channels = 1 if pixels.ndim == 2 else pixels.shape[2]
            hist = result.histograms.setdefault(channels, np.zeros((channels, 256), dtype=np.int64))
            for c in range(channels):
                hist[c] += np.bincount((pixels if channels == 1 else pixels[..., c]).ravel(), minlength=256)
        out.write(b"\0" * 1024)  # end-of-archive marker
        if count == 0:  # nothing valid: leave no empty shard behind
            raise _EmptyGroup(result)
    result.entry = ShardEntry(
        url=url, split=group.split, num_samples=count, num_bytes=out.num_bytes, sha256=out.sha256.hexdigest()
    )
    return result


class _EmptyGroup(Exception):
    def __init__(self, result: GroupResult) -> None:
        self.result = result


# A process pool gets the plan once per worker (it can list 100k items), then only group numbers.
_WORKER_PLAN: ShardPlan | None = None


def _init_worker(plan: ShardPlan) -> None:
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _run_in_worker(index: int) -> tuple[int, GroupResult]:
    assert _WORKER_PLAN is not None
    return index, write_shard_group(_WORKER_PLAN, index)


# -- the driver ------------------------------------------------------------------------------------------


def _image_stats(cfg: PipelineConfig, plan: ShardPlan, results: Sequence[GroupResult]) -> ImageStats:
    sizes, modes = Counter(), Counter()
    train_sizes = Counter()
    histograms: dict[int, np.ndarray] = {}
    for group, r in zip(plan.groups, results, strict=True):
        sizes += r.sizes
        modes += r.modes
        if group.split == "train" or not any(g.split == "train" for g in plan.groups):
            train_sizes += r.sizes
            for c, hist in r.histograms.items():
                histograms[c] = histograms.get(c, 0) + hist
    mode = cfg.data.mode
    if mode == "auto":
        mode = "RGB" if any(m in COLOUR_MODES for m in modes) else "L"
    channels = 1 if mode == "L" else 3
    hist = np.zeros((channels, 256))
    for c, h in histograms.items():  # grey images count as R = G = B in an RGB dataset
        hist += h if c == channels else np.repeat(h, channels, axis=0)
    values = np.arange(256) / 255
    count = np.maximum(hist.sum(1), 1)
    mean = hist @ values / count
    std = np.sqrt(np.maximum(hist @ values**2 / count - mean**2, 0))
    if cfg.data.image_size:
        size = (cfg.data.image_size, cfg.data.image_size)
    else:
        h, w = train_sizes.most_common(1)[0][0].split("x")
        size = (int(h), int(w))
    return ImageStats(
        size=size,
        mode=mode,
        mean=[round(float(x), 6) for x in mean],
        std=[round(float(x), 6) for x in std],
        sizes=dict(sizes.most_common(20)),
        modes=dict(modes),
    )


def _code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(__file__),
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"lejepa {lejepa.__version__}" + (f" ({commit})" if commit else "")


def _summary(m: ShardManifest, up_to_date: bool, seconds: float = 0.0, images: int = 0) -> ShardSummary:
    return ShardSummary(
        manifest=m.url,
        version=m.version,
        num_samples={s: i.num_samples for s, i in m.splits.items()},
        num_shards=len(m.shards),
        rejected=len(m.rejected),
        up_to_date=up_to_date,
        seconds=round(seconds, 3),
        images_per_s=round(images / seconds, 1) if seconds > 0 else 0.0,
    )


def _start_method(plan: ShardPlan, configured: str) -> str:
    if configured != "auto":
        return configured
    remote = [s.protocol != "file" for s in (plan.storage, getattr(plan.source, "storage", plan.storage))]
    # fork skips re-importing and re-loading the source in every worker, but must not copy s3fs's
    # threads and sockets into a child: spawn whenever a remote filesystem is in play.
    return "spawn" if any(remote) or "fork" not in multiprocessing.get_all_start_methods() else "fork"


def _run_groups(
    plan: ShardPlan, workers: int, progress: bool, start_method: str = "auto"
) -> list[GroupResult]:
    from tqdm import tqdm

    crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0"))
    results: list[GroupResult | None] = [None] * len(plan.groups)
    bar = tqdm(
        total=plan.num_items,
        unit="img",
        unit_scale=True,
        desc=f"shard {plan.name}",
        file=sys.stderr,
        disable=not progress,
    )
    done = 0

    def finished(index: int, result: GroupResult) -> None:
        nonlocal done
        results[index] = result
        bar.update(len(plan.groups[index].items))
        done += 1
        if crash_after and done >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    pending = deque(range(len(plan.groups)))
    with bar, contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            # The main process writes groups too, from the first second; the pool's processes join in
            # as they come up.
            ctx = multiprocessing.get_context(_start_method(plan, start_method))
            pool = stack.enter_context(
                ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(plan,))
            )
        in_flight: set[Future] = set()
        while pending or in_flight:
            while pool is not None and pending and len(in_flight) < 2 * (workers - 1):
                in_flight.add(pool.submit(_run_in_worker, pending.pop()))  # the pool takes from the end
            if pending:
                index = pending.popleft()
                finished(index, write_shard_group(plan, index))
            else:
                wait(in_flight, return_when=FIRST_COMPLETED)
            for future in [f for f in in_flight if f.done()]:
                in_flight.remove(future)
                finished(*future.result())
    return results  # type: ignore[return-value]


def write_shards(cfg: PipelineConfig, force: bool = False, progress: bool = True) -> ShardSummary:
    """Shard `cfg.data` into `cfg.storage`, or return at once when that exact dataset is already there."""
    start = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    storage.check(write=True)
    source = open_source(cfg.data, storage)
    fingerprint = source.fingerprint()
    manifest_url = _manifest_url(storage, cfg, _version(cfg, fingerprint))
    if storage.exists(manifest_url) and not force:  # up to date: decided before listing a single sample
        return _summary(ShardManifest.load(storage, manifest_url), up_to_date=True)
    with Lease(storage, posixpath.dirname(manifest_url), "sharded"):
        if storage.exists(manifest_url):
            storage.rm(manifest_url)  # uncommit first: a crash during the rebuild must not expose it
        plan = plan_shards(cfg, storage, source, fingerprint)
        for stale in storage.ls(plan.dataset_url):  # temporary files of a killed run
            if posixpath.basename(stale).startswith(TMP_PREFIX):
                storage.rm(stale)
        workers = min(cfg.shard.workers or os.cpu_count() or 1, len(plan.groups))
        results = _run_groups(plan, workers, progress, cfg.shard.start_method)
        return commit_manifest(cfg, plan, results, seconds=time.perf_counter() - start)


def commit_manifest(
    cfg: PipelineConfig, plan: ShardPlan, results: Sequence[GroupResult], seconds: float = 0.0
) -> ShardSummary:
    """Write manifest.json (the commit point) from every group's result, then the `latest` pointer.

    Raises DataError when no group wrote a valid image; nothing is committed then.
    """
    storage = plan.storage
    shards = [r.entry for r in results if r.entry is not None]
    rejected = [RejectedSample(id=r.id, reason=r.reason) for r in plan.listing_rejects]
    rejected += [x for r in results for x in r.rejected]
    if not shards:
        first = f" (first: {rejected[0].id}: {rejected[0].reason})" if rejected else ""
        raise DataError(
            f"{plan.source.kind}: no valid images in {cfg.data.path or plan.source.kind}"
            f", {len(rejected)} rejected{first}"
        )
    rejected_ids = {r.id for r in rejected}
    splits = {}
    for split in SPLITS:
        mine = [s for s in shards if s.split == split]
        if mine:
            members = [
                it for g in plan.groups if g.split == split for _, it in g.items if it.id not in rejected_ids
            ]
            splits[split] = SplitInfo(
                num_samples=sum(s.num_samples for s in mine),
                num_shards=len(mine),
                fingerprint=split_fingerprint(plan.name, members),
            )
    manifest = ShardManifest(
        name=plan.name,
        version=plan.version,
        url=plan.manifest_url,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version=_code_version(),
        source={"kind": plan.source.kind, "path": cfg.data.path, "fingerprint": plan.fingerprint},
        params=plan.params,
        class_names=plan.class_names,
        splits=splits,
        image=_image_stats(cfg, plan, results),
        shards=shards,
        rejected=rejected,
    )
    storage.write_json(plan.manifest_url, manifest.model_dump(mode="json"))
    storage.write_json(
        storage.url("datasets", plan.name, "latest.json"),
        {"version": plan.version, "manifest": plan.manifest_url},
    )
    return _summary(
        manifest,
        up_to_date=False,
        seconds=seconds,
        images=sum(s.num_samples for s in shards),
    )


run_shard = write_shards


# -- command line ----------------------------------------------------------------------------------------


def cli(argv: list[str] | None = None) -> int:
    """`lejepa-pipeline shard --config FILE [--set key=value ...] [--force]`; the last line is JSON."""
    parser = stage_parser("lejepa-pipeline shard", __doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the dataset is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    return run_stage(lambda: write_shards(config_from(args), force=args.force, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(cli())
