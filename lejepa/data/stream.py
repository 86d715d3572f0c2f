"""Streaming the shards back: an endless, resumable training stream and a plain evaluation loader.

Only shards a manifest lists are read, through the storage layer (local or s3:// via fsspec).

How an epoch of `TrainStream` is laid out, for `world_size` ranks with `num_workers` loader workers each:
1. The split's shards are put in a seeded per-epoch order and read as one sequence of N samples.
2. Each rank takes a contiguous slice of `steps_per_epoch * batch_size` samples, where
   `steps_per_epoch = N // (batch_size * world_size)`, so every rank yields the same number of full
   batches (DeepSpeed's collectives hang otherwise). The remaining N mod (batch_size * world_size)
   samples at the end of the epoch's order are dropped; as the order changes every epoch, so do they.
3. Inside a rank, the DataLoader hands out batches round-robin (batch j comes from worker j % workers),
   so worker w gets the contiguous run of samples of its batches, shuffles them through a seeded buffer,
   decodes and batches them, and applies the views with a generator seeded by
   (seed, epoch, rank, batch index); everything a batch holds is fixed by those numbers.
Resuming at batch j of an epoch skips, in each worker, the raw samples of the batches already consumed
(after the shuffle buffer, before decoding), and rotates the workers' roles so the DataLoader's
round-robin starts at batch j: the same seed, world size and worker count give the same batches.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import itertools
import multiprocessing
import os
import posixpath
import random
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lejepa.data.manifest import ImageStats, ShardEntry, ShardManifest
from lejepa.data.tarfiles import image_member, iter_tar_samples
from lejepa.store.errors import DataError
from lejepa.store.storage import Storage
from lejepa.with_parent import die_with_parent

Transform = Callable[[torch.Tensor, torch.Generator], Any]


def load_manifest(manifest: ShardManifest | str, storage: Storage) -> ShardManifest:
    return manifest if isinstance(manifest, ShardManifest) else ShardManifest.load(storage, manifest)


def decode_image(data: bytes, image: ImageStats) -> np.ndarray:
    """Encoded bytes -> uint8 (C, H, W) in the dataset's mode and size (scaled to cover, centre-cropped)."""
    im = Image.open(io.BytesIO(data))
    if im.mode != image.mode:
        im = im.convert(image.mode)
    h, w = image.size
    if (im.height, im.width) != (h, w):
        scale = max(h / im.height, w / im.width)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
    pixels = np.asarray(im)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class Sample(NamedTuple):
    """One raw sample of a shard: its members by extension, and where it is from (for messages)."""

    url: str
    key: str
    members: dict[str, bytes]


def _label(members: dict[str, bytes]) -> int:
    return int(members["cls"]) if "cls" in members else -1


# Undecodable images this process skipped. Each skip prints one warning line with the running count on
# stderr (a loader worker's stderr is its rank's, which the launcher and Prefect show): that is how the
# count reaches the user.
_skipped = itertools.count(1)


def _collate(
    samples: Iterator[Sample], image: ImageStats, size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The next `size` decodable samples of `samples` (fewer if it runs out) as (uint8 images, labels), or
    None when none is left. An image that cannot be decoded is skipped together with its label.
    """
    images, labels = [], []
    for sample in samples:
        try:
            images.append(decode_image(sample.members[image_member(sample.members)], image))
        except Exception as exc:  # any decoder failure means a bad file: one sample lost, not the job
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(
                f"warning: skipped undecodable image {sample.key} of {sample.url} ({reason}); "
                f"{next(_skipped)} skipped by this process",
                file=sys.stderr,
                flush=True,
            )
            continue
        labels.append(_label(sample.members))
        if len(images) == size:
            break
    if not images:
        return None
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


@dataclass(frozen=True)
class ShardRange:
    """Samples [start, stop) of one shard, in the shard's order."""

    shard: ShardEntry
    start: int
    stop: int


class _HashingReader:
    """A read-only file that hashes and counts what is read through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.num_bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data


def _read_ranges(storage: Storage, ranges: list[ShardRange]) -> Iterator[Sample]:
    """Raw samples of the ranges, in order; samples before `start` are read but not decoded.

    A range that reaches the end of its shard checks the shard against the manifest's sha256 before handing
    out the last sample: every byte has been read by then, so the check costs only the hashing. A range
    that stops before the end (a rank's or worker's run ending mid-shard) leaves the check to the run that
    reads the shard's end, as hashing the rest would mean reading it. A corrupt or truncated shard is a
    DataError naming it and the fix.
    """
    for r in ranges:
        url, expected = r.shard.url, r.shard.num_samples
        with storage.open(url, "rb") as raw:
            f = _HashingReader(raw)
            n = 0
            try:
                for key, members in iter_tar_samples(f, url):
                    if n == expected - 1:  # the shard's last sample: only the end-of-archive blocks are left
                        while f.read(1 << 20):
                            pass
                        if f.sha256.hexdigest() != r.shard.sha256:
                            raise DataError(
                                f"{url} does not match its sha256 in the manifest ({f.num_bytes} bytes read, "
                                f"{r.shard.num_bytes} listed): the shard is corrupt"
                            )
                    if n >= r.start:
                        yield Sample(url, key, members)
                    n += 1
                    if n == r.stop:
                        break
                else:
                    raise DataError(f"{url} ends after {n} samples, the manifest lists {expected}: truncated")
            except DataError as exc:
                raise DataError(
                    f"{exc}: rewrite the shards with `lejepa-pipeline shard --force` "
                    f"(or delete {posixpath.dirname(url)} and shard again)"
                ) from None


def _spares(storage: Storage, order: list[ShardEntry], start: int, stop: int) -> Iterator[Sample]:
    """The epoch's samples after [start, stop), wrapping around, read only when needed: they stand in for
    undecodable images, so a worker's batches stay full. Raises when even they run out."""
    total = sum(s.num_samples for s in order)
    yield from _read_ranges(storage, _slice(order, stop, total) + _slice(order, 0, start))
    raise DataError(
        "too few decodable images in the split to fill a batch (see the warnings above): check that "
        "this machine's Pillow decodes the dataset's image formats"
    )


def _slice(shards: list[ShardEntry], start: int, stop: int) -> list[ShardRange]:
    """The pieces of shards that positions [start, stop) of their concatenation cover."""
    out, offset = [], 0
    for s in shards:
        lo, hi = max(start, offset), min(stop, offset + s.num_samples)
        if lo < hi:
            out.append(ShardRange(s, lo - offset, hi - offset))
        offset += s.num_samples
    return out


def _shuffled(samples: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: each output is drawn at random from the next `buffer_size` candidates."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate for ready-made batches: keep tuples as tuples (its default makes lists)."""
    return batch


def _seed(*numbers: int) -> int:
    return int(np.random.SeedSequence([n & 0xFFFFFFFF for n in numbers]).generate_state(1, np.uint64)[0])


def batch_generator(
    seed: int, epoch: int, rank: int, batch: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator the views of one batch are drawn from: fixed by the batch's place in the run."""
    return torch.Generator(device).manual_seed(_seed(seed, epoch, rank, batch))


class _TrainEpoch(IterableDataset):
    """One rank's batches of one epoch, from `first_batch` on; each DataLoader worker makes its share."""

    def __init__(self, stream: TrainStream, epoch: int, first_batch: int) -> None:
        self.stream, self.epoch, self.first_batch = stream, epoch, first_batch

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        s = self.stream
        info = get_worker_info()
        workers = max(1, s.num_workers)
        # Rotate roles so that DataLoader worker 0 makes the batch the resumed epoch starts with.
        worker = ((info.id if info else 0) + self.first_batch) % workers
        mine = range(worker, s.steps_per_epoch, workers)  # batch indices this worker makes
        before = sum(len(range(w, s.steps_per_epoch, workers)) for w in range(worker))
        start = s.rank * s.steps_per_epoch * s.batch_size + before * s.batch_size
        order = s.shard_order(self.epoch)
        stop = start + len(mine) * s.batch_size
        raw = _read_ranges(s.storage, _slice(order, start, stop))
        rng = random.Random(_seed(s.seed, self.epoch, s.rank, worker))
        samples = _shuffled(raw, s.shuffle_buffer, rng) if s.shuffle_buffer > 1 else raw
        # A batch skips undecodable images and takes the next samples, so a worker may read a few past its
        # run. The resume skip below does not decode: after a skipped image, a resumed epoch is shifted by
        # one sample from the uninterrupted one (its batches stay full and fixed by the same numbers).
        samples = itertools.chain(samples, _spares(s.storage, order, start, stop))
        skip = len(range(worker, self.first_batch, workers))
        for _ in range(skip * s.batch_size):
            next(samples)
        for batch_index in mine[skip:]:
            images, labels = _collate(samples, s.manifest.image, s.batch_size)
            if s.transform is not None:
                with torch.no_grad():
                    images = s.transform(images, batch_generator(s.seed, self.epoch, s.rank, batch_index))
            yield images, labels


class TrainStream:
    """Endless training batches `(views_or_images, labels)` from a manifest's split; see the module doc.

    Yields exactly `steps_per_epoch` full batches per epoch on every rank, then goes on with the next
    epoch. Without a transform the first element is uint8 images (B, C, H, W) at the dataset's size; with
    one it is whatever `transform(images, generator)` returns (MultiCropViews: global, local views).
    Labels are int64 (B,), -1 for unlabelled samples.
    """

    def __init__(
        self,
        manifest: ShardManifest | str,
        storage: Storage,
        *,
        split: str = "train",
        batch_size: int,
        transform: Transform | None = None,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.storage = storage
        self.manifest = load_manifest(manifest, storage)
        self.shards = self.manifest.shards_for(split)
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.num_workers, self.seed, self.rank, self.world_size = num_workers, seed, rank, world_size
        self.shuffle_buffer, self.prefetch_factor = shuffle_buffer, prefetch_factor
        self.pin_memory = pin_memory  # page-locked batches, so copies to a GPU are asynchronous
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = sum(s.num_samples for s in self.shards)
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"split '{split}' has {self.num_samples} samples, fewer than one batch per rank "
                f"({batch_size} x {world_size}): lower the batch size"
            )
        self.epoch, self.batch_in_epoch = 0, 0

    def shard_order(self, epoch: int) -> list[ShardEntry]:
        """The epoch's seeded shard order; the same on every rank, so their slices never overlap."""
        order = list(self.shards)
        random.Random(_seed(self.seed, epoch)).shuffle(order)
        return order

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from; save it with the checkpoint of the step just taken."""
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def last_batch_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator for views of the batch just yielded, made outside the loader (on `device`)."""
        return batch_generator(self.seed, self.epoch, self.rank, self.batch_in_epoch - 1, device)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        while True:
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            epoch = _TrainEpoch(self, self.epoch, self.batch_in_epoch)
            loader = DataLoader(
                epoch,
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor if self.num_workers else None,
                pin_memory=self.pin_memory,
                worker_init_fn=_dies_with(os.getpid()),
            )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch


class _EvalSplit(IterableDataset):
    def __init__(
        self,
        storage: Storage,
        manifest: ShardManifest,
        shards: list[ShardEntry],
        batch_size: int,
        slots: int,
        first_slot: int,
    ) -> None:
        self.storage, self.manifest, self.shards = storage, manifest, shards
        self.batch_size, self.slots, self.first_slot = batch_size, slots, first_slot

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        slot = self.first_slot + (info.id if info else 0)
        mine = [ShardRange(s, 0, s.num_samples) for s in self.shards[slot :: self.slots]]
        samples = _read_ranges(self.storage, mine)
        # An undecodable image is dropped with its label, so features and labels stay aligned.
        while (batch := _collate(samples, self.manifest.image, self.batch_size)) is not None:
            yield batch


def eval_loader(
    manifest: ShardManifest | str,
    storage: Storage,
    split: str = "test",
    batch_size: int = 256,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Every sample of `split` exactly once (across ranks), in a fixed order, as (uint8 images, labels).

    No augmentation; a worker's last batch may be smaller. With world_size > 1 each rank gets a disjoint
    set of shards (ranks may get different numbers of batches). pin_memory pages batches in for
    asynchronous copies to a GPU.
    """
    m = load_manifest(manifest, storage)
    workers = max(1, num_workers)
    dataset = _EvalSplit(storage, m, m.shards_for(split), batch_size, world_size * workers, rank * workers)
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_dies_with(os.getpid()),
    )


def _dies_with(reader: int) -> Callable[[int], None]:
    """A loader worker's start: die with `reader`, the process reading the loader. A worker notices its
    reader is gone only between reads (every 5 s at best): one blocked in a read from storage would
    otherwise outlive a killed rank by as long as the read takes, or for good."""
    _workers_killed_at_exit()
    return functools.partial(_die_with, reader)


@functools.cache
def _workers_killed_at_exit() -> None:
    """At exit, multiprocessing stops a process's daemonic children (loader workers) with SIGTERM, which
    ours ignore, then waits for them: for good, where a loader was left open (one that raised, its
    iterator still held by the traceback). This hook, registered after multiprocessing's own and so run
    before it, kills them first."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def _die_with(reader: int, _worker_id: int) -> None:
    # A scheduler's SIGTERM reaches every process of a rank: the reader commits a checkpoint on it and
    # needs its workers until then; they die with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, parent=reader)
