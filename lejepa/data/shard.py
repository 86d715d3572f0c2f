"""Shard stage: any image source to WebDataset tar shards on object storage, committed by a manifest.

Each dataset version is one folder of shards, `{split}-000000.tar`, with its manifest beside them and the
dataset's `latest` pointer moved to it (`lejepa.store.layout` says where; `lejepa.data.manifest` holds the
schema). Each sample is `key.png|jpg|...` (the source's bytes when already encoded, PNG for raw pixels),
`key.cls` when labelled, `key.json` (`lejepa.data.tarfiles` writes and reads them).

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
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import BaseModel

import lejepa
from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import DataConfig, PipelineConfig
from lejepa.data.manifest import (
    ImageStats,
    RejectedSample,
    ShardEntry,
    ShardManifest,
    SplitInfo,
    dataset_name,
    dataset_version,
    locate_manifest,
    manifest_url_for,
    sharding_params,
)
from lejepa.data.png import encode_png
from lejepa.data.sources import Item, Payload, Rejection, Source, open_source
from lejepa.data.tarfiles import TarWriter
from lejepa.store import layout
from lejepa.store.errors import DataError
from lejepa.store.lease import Lease
from lejepa.store.storage import TMP_PREFIX, Storage
from lejepa.with_parent import die_with_parent

SPLITS = ("train", "val", "test")
# Fault injection for the crash-safety test: SIGKILL this process after N shards are written.
CRASH_AFTER_ENV = "LEJEPA_SHARD_CRASH_AFTER"
COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


class ShardSummary(BaseModel):
    """What the stage reports: the committed manifest, its sizes, and whether it was already there."""

    manifest: str
    version: str
    num_samples: dict[str, int]
    num_shards: int
    rejected: int
    up_to_date: bool
    seconds: float = 0.0
    images_per_s: float = 0.0

    @classmethod
    def of(cls, m: ShardManifest, up_to_date: bool, seconds: float = 0.0, images: int = 0) -> ShardSummary:
        return cls(
            manifest=m.url,
            version=m.version,
            num_samples={s: i.num_samples for s, i in m.splits.items()},
            num_shards=len(m.shards),
            rejected=len(m.rejected),
            up_to_date=up_to_date,
            seconds=round(seconds, 3),
            images_per_s=round(images / seconds, 1) if seconds > 0 else 0.0,
        )


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
        return layout.shard_name(self.split, self.index)


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
        return layout.dataset_url(self.storage, self.name, self.version)

    @property
    def manifest_url(self) -> str:
        return layout.manifest_url(self.storage, self.name, self.version)

    @property
    def num_items(self) -> int:
        return sum(len(g.items) for g in self.groups)


def _hash_key(seed: int, item_id: str) -> bytes:
    # A seeded hash of the sample's identity: it places the sample in a split and orders the shards.
    return hashlib.sha256(f"{seed}:{item_id}".encode()).digest()


def split_of(item: Item, data: DataConfig, has_test: bool) -> str:
    """The split of one sample, decided by its own id alone: its seeded hash as a number in [0, 1) is `val`
    below val_fraction, then `test` below val_fraction + test_fraction (for sources without a test split of
    their own), else `train`. Files that come and go never move another one across a boundary."""
    if item.split == "test":
        return "test"
    position = int.from_bytes(_hash_key(data.split_seed, item.id)[:8], "big") / 2**64
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
            members.sort(key=lambda x: _hash_key(d.split_seed, x[1].id))
    return {s: m for s, m in out.items() if m}


def split_fingerprint(dataset: str, items: Sequence[Item]) -> str:
    """What makes two splits the same: the dataset's name and its samples' sorted (id, label) pairs."""
    blob = json.dumps([dataset, sorted([item.id, item.label] for item in items)]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
        name=dataset_name(cfg.data),
        version=dataset_version(cfg, fingerprint),
        storage=storage,
        source=source,
        params=sharding_params(cfg),
        fingerprint=fingerprint,
        groups=groups,
        class_names=source.class_names(),
        listing_rejects=rejects,
    )


# -- writing one group -----------------------------------------------------------------------------------


@dataclass
class GroupResult:
    """A written shard plus what the manifest needs to know about its samples."""

    entry: ShardEntry | None
    rejected: list[RejectedSample]
    sizes: Counter
    modes: Counter
    histograms: dict[int, np.ndarray]
    """channels -> (channels, 256) counts of each pixel value, per channel (exact, cheap statistics)."""

    def to_json(self) -> dict[str, Any]:
        """The result as JSON values (what the orchestrated stage persists), read back by `from_json`."""
        return {
            "entry": self.entry.model_dump() if self.entry else None,
            "rejected": [r.model_dump() for r in self.rejected],
            "sizes": dict(self.sizes),
            "modes": dict(self.modes),
            "histograms": {str(c): h.tolist() for c, h in self.histograms.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupResult:
        return cls(
            entry=ShardEntry.model_validate(data["entry"]) if data["entry"] else None,
            rejected=[RejectedSample.model_validate(r) for r in data["rejected"]],
            sizes=Counter(data["sizes"]),
            modes=Counter(data["modes"]),
            histograms={int(c): np.asarray(h, dtype=np.int64) for c, h in data["histograms"].items()},
        )

    def add_image(self, pixels: np.ndarray, mode: str, h: int, w: int) -> None:
        """Add one written image to the statistics."""
        self.sizes[f"{h}x{w}"] += 1
        self.modes[mode] += 1
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        hist = self.histograms.setdefault(channels, np.zeros((channels, 256), dtype=np.int64))
        for c in range(channels):
            hist[c] += np.bincount((pixels if channels == 1 else pixels[..., c]).ravel(), minlength=256)


def _decoded(payload: Payload, level: int, target_mode: str) -> tuple[bytes, str, np.ndarray, str, tuple]:
    """(bytes to store, extension, pixels for statistics, PIL mode, (h, w)); raises if undecodable."""
    from PIL import Image

    if isinstance(payload, np.ndarray):
        mode = "L" if payload.ndim == 2 else "RGB"
        return encode_png(payload, level), "png", payload, mode, payload.shape[:2]
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
        out = TarWriter(raw)
        for item, payload in plan.source.read([it for _, it in group.items]):
            try:
                if isinstance(payload, Exception):
                    raise payload
                data, ext, pixels, mode, (h, w) = _decoded(payload, level, target_mode)
            except Exception as exc:  # any decoder failure means a bad file, never a bad run
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                result.rejected.append(RejectedSample(id=item.id, reason=reason))
                continue
            members = {ext: data}
            if item.label >= 0:
                members["cls"] = str(item.label).encode()
            members["json"] = json.dumps({"id": item.id, "size": [h, w], "mode": mode}).encode()
            out.write_sample(f"{numbers[item]:08d}", members)
            count += 1
            result.add_image(pixels, mode, h, w)
        out.finish()
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


def _init_worker(plan: ShardPlan, stage_pid: int) -> None:
    global _WORKER_PLAN
    # A worker outlives no stage: one that kept writing would race a retry's writers in the same folder.
    die_with_parent(signal.SIGKILL, parent=stage_pid)
    _WORKER_PLAN = plan


def _run_in_worker(index: int) -> tuple[int, GroupResult]:
    assert _WORKER_PLAN is not None
    return index, write_shard_group(_WORKER_PLAN, index)


# -- the driver ------------------------------------------------------------------------------------------


def _start_method(plan: ShardPlan, configured: str) -> str:
    if configured != "auto":
        return configured
    remote = [s.protocol != "file" for s in (plan.storage, getattr(plan.source, "storage", plan.storage))]
    # fork skips re-importing and re-loading the source in every worker, but must not copy s3fs's
    # threads and sockets into a child: spawn whenever a remote filesystem is in play.
    return "spawn" if any(remote) or "fork" not in multiprocessing.get_all_start_methods() else "fork"


def _worker_pool(
    stack: contextlib.ExitStack, plan: ShardPlan, workers: int, start_method: str
) -> ProcessPoolExecutor | None:
    """`workers - 1` processes that write groups beside the main process, or None for one worker."""
    if workers <= 1:
        return None
    ctx = multiprocessing.get_context(_start_method(plan, start_method))
    pool = ProcessPoolExecutor(
        workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(plan, os.getpid())
    )
    return stack.enter_context(pool)


def _crash_if_due(written: int) -> None:
    """Fault injection: SIGKILL this process once `LEJEPA_SHARD_CRASH_AFTER` shards are written."""
    crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0"))
    if crash_after and written >= crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


def _run_groups(
    plan: ShardPlan, workers: int, progress: bool, start_method: str = "auto"
) -> list[GroupResult]:
    from tqdm import tqdm

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
        _crash_if_due(done)

    pending = deque(range(len(plan.groups)))
    with bar, contextlib.ExitStack() as stack:
        # The main process writes groups too, from the first second; the pool's processes join in as they
        # come up.
        pool = _worker_pool(stack, plan, workers, start_method)
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


def committed_dataset(
    cfg: PipelineConfig, force: bool = False, storage: Storage | None = None, fingerprint: str | None = None
) -> ShardSummary | None:
    """The summary of `cfg`'s dataset when exactly that version is committed, else None (to be sharded).

    With force the version is uncommitted instead (its manifest removed), so a crash during the rebuild
    never exposes it. Checks first that the store is writable.
    """
    storage = storage or Storage.from_config(cfg.storage)
    storage.check(write=True)
    url = manifest_url_for(cfg, storage, fingerprint)
    if not storage.exists(url):
        return None
    if force:
        storage.rm(url)
        return None
    return ShardSummary.of(ShardManifest.load(storage, url), up_to_date=True)


def stored_dataset(cfg: PipelineConfig) -> ShardSummary:
    """The summary of the committed dataset a later stage would read (see `locate_manifest`)."""
    storage = Storage.from_config(cfg.storage)
    return ShardSummary.of(ShardManifest.load(storage, locate_manifest(cfg, storage)), up_to_date=True)


def write_shards(cfg: PipelineConfig, force: bool = False, progress: bool = True) -> ShardSummary:
    """Shard `cfg.data` into `cfg.storage`, or return at once when that exact dataset is already there."""
    start = time.perf_counter()
    storage = Storage.from_config(cfg.storage)
    source = open_source(cfg.data, storage)
    fingerprint = source.fingerprint()
    committed = committed_dataset(cfg, force, storage, fingerprint)  # decided before listing a sample
    if committed is not None:
        return committed
    with Lease(storage, posixpath.dirname(manifest_url_for(cfg, storage, fingerprint)), "sharded"):
        plan = plan_shards(cfg, storage, source, fingerprint)
        for stale in storage.ls(plan.dataset_url):  # temporary files of a killed run
            if posixpath.basename(stale).startswith(TMP_PREFIX):
                storage.rm(stale)
        workers = min(cfg.shard.workers or os.cpu_count() or 1, len(plan.groups))
        results = _run_groups(plan, workers, progress, cfg.shard.start_method)
        return commit_manifest(cfg, plan, results, seconds=time.perf_counter() - start)


# -- committing ------------------------------------------------------------------------------------------


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


def _split_infos(
    plan: ShardPlan, shards: Sequence[ShardEntry], rejected: Sequence[RejectedSample]
) -> dict[str, SplitInfo]:
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
    return splits


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


def commit_manifest(
    cfg: PipelineConfig, plan: ShardPlan, results: Sequence[GroupResult], seconds: float = 0.0
) -> ShardSummary:
    """Write the manifest (the commit point) from every group's result, then the dataset's `latest` pointer.

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
    manifest = ShardManifest(
        name=plan.name,
        version=plan.version,
        url=plan.manifest_url,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version=_code_version(),
        source={"kind": plan.source.kind, "path": cfg.data.path, "fingerprint": plan.fingerprint},
        params=plan.params,
        class_names=plan.class_names,
        splits=_split_infos(plan, shards, rejected),
        image=_image_stats(cfg, plan, results),
        shards=shards,
        rejected=rejected,
    )
    storage.write_json(plan.manifest_url, manifest.model_dump(mode="json"))
    storage.write_json(
        layout.dataset_latest_url(storage, plan.name),
        {"version": plan.version, "manifest": plan.manifest_url},
    )
    images = sum(s.num_samples for s in shards)
    return ShardSummary.of(manifest, up_to_date=False, seconds=seconds, images=images)


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
