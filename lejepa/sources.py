"""Image sources the shard stage reads: fashion-mnist, digits, imagefolder, webdataset.

A source lists its samples once (`items`, cheap: names and labels, no pixels) and then reads any subset of
them (`read`), so the shard stage can split the work into independent groups. A read yields either raw
pixels (a uint8 array, encoded to PNG once by the shard writer) or the source's encoded bytes, which are
kept as they are; a sample that cannot be read yields the exception, and the writer records it as rejected.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lejepa.config import DataConfig
from lejepa.errors import DataError
from lejepa.storage import Storage
from lejepa.tarfiles import image_member, iter_tar_samples

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass(frozen=True)
class Item:
    """One sample of a source, before it is read."""

    id: str
    """Stable identity inside the source (a file path, `train/123`); recorded in the sample's json."""
    split: str
    """The source's own split: train or test."""
    label: int
    """Class index, -1 when unlabelled."""
    ref: Any
    """Whatever the source needs to read the sample back (an array index, a URL, a tar position)."""


@dataclass(frozen=True)
class Rejection:
    id: str
    reason: str


Payload = np.ndarray | tuple[bytes, str] | Exception
"""Raw pixels (H, W) or (H, W, 3) uint8, or (encoded bytes, extension), or why the sample is unreadable."""


class Source:
    kind: str
    sequential = False
    """True when reads must follow the listing order (tar streams): shards then keep the source order."""

    def fingerprint(self) -> str:
        """Changes whenever the source's content may have changed."""
        raise NotImplementedError

    def items(self) -> tuple[list[Item], list[Rejection]]:
        """Every sample, in a deterministic order, and what was rejected while listing."""
        raise NotImplementedError

    def class_names(self) -> list[str] | None:
        raise NotImplementedError

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        raise NotImplementedError


def _sha256(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()


# -- fashion-mnist -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip or not) as a numpy array; cached so each worker process decompresses it once."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Source):
    kind = "fashion-mnist"
    _files = {"train": "train-{}-ubyte", "test": "t10k-{}-ubyte"}

    def __init__(self, path: str | None, limit: int | None = None) -> None:
        self.path = path or FASHION_MNIST_PATH
        self.limit = limit
        if not os.path.isdir(self.path):
            raise DataError(
                f"fashion-mnist: {self.path} does not exist: install the Debian package "
                "dataset-fashion-mnist or set data.path to the folder with the IDX files"
            )

    def _file(self, split: str, what: str) -> str:
        stem = os.path.join(self.path, self._files[split].format(what))
        for candidate in (stem + ".gz", stem):
            if os.path.isfile(candidate):
                return candidate
        raise DataError(f"fashion-mnist: {stem}[.gz] is missing in {self.path}")

    def fingerprint(self) -> str:
        files = [self._file(s, w) for s in self._files for w in ("images-idx3", "labels-idx1")]
        digests = []
        for name in files:
            with open(name, "rb") as f:
                digests.append(hashlib.sha256(f.read()).hexdigest())
        return _sha256(self.kind, digests, self.limit)

    def items(self) -> tuple[list[Item], list[Rejection]]:
        out = []
        for split in self._files:
            labels = _read_idx(self._file(split, "labels-idx1"))[: self.limit]
            out += [Item(f"{split}/{i}", split, int(y), i) for i, y in enumerate(labels)]
        return out, []

    def class_names(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        images = {split: _read_idx(self._file(split, "images-idx3")) for split in {i.split for i in items}}
        for item in items:
            yield item, images[item.split][item.ref]


# -- digits --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities scaled to the full 0..255 range.
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


class Digits(Source):
    """scikit-learn's bundled 8x8 digits (1797 images): needs nothing installed or downloaded."""

    kind = "digits"

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit

    def fingerprint(self) -> str:
        images, labels = _digits()
        return _sha256(self.kind, images.tobytes(), labels.tobytes(), self.limit)

    def items(self) -> tuple[list[Item], list[Rejection]]:
        labels = _digits()[1][: self.limit]
        return [Item(f"train/{i}", "train", int(y), i) for i, y in enumerate(labels)], []

    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        images = _digits()[0]
        for item in items:
            yield item, images[item.ref]


# -- imagefolder ---------------------------------------------------------------------------------------


def _ext(url: str) -> str:
    return posixpath.splitext(url)[1].lstrip(".").lower()


class ImageFolder(Source):
    """`path/<class>/<image>` (labelled) or `path/<image>` (unlabelled); any format and size PIL reads."""

    kind = "imagefolder"

    def __init__(self, storage: Storage, limit: int | None = None) -> None:
        self.storage = storage
        self.limit = limit
        if not storage.exists(storage.root):
            raise DataError(
                f"imagefolder: {storage.root} does not exist: set data.path to a folder of images"
            )
        self._files = {
            url: info
            for url, info in storage.find(storage.root).items()
            if not posixpath.basename(url).startswith(".")
        }
        if not self._files:
            raise DataError(
                f"imagefolder: no files in {storage.root}: put images in <class>/ folders under it"
            )
        rel = [self._rel(url) for url in self._files]
        self._classes = sorted({r.split("/")[0] for r in rel if "/" in r})

    def _rel(self, url: str) -> str:
        return url[len(self.storage.root) :].lstrip("/")

    def fingerprint(self) -> str:
        listing = [
            (self._rel(u), i.get("size"), i.get("ETag") or i.get("mtime") or i.get("LastModified"))
            for u, i in self._files.items()
        ]
        return _sha256(self.kind, listing, self.limit)

    def items(self) -> tuple[list[Item], list[Rejection]]:
        items, rejected = [], []
        for url in self._files:
            rel = self._rel(url)
            if self._classes and "/" not in rel:
                rejected.append(Rejection(rel, "outside the class folders"))
                continue
            label = self._classes.index(rel.split("/")[0]) if self._classes else -1
            items.append(Item(rel, "train", label, url))
        return items[: self.limit], rejected

    def class_names(self) -> list[str] | None:
        return list(self._classes) or None

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        for item in items:
            try:
                yield item, (self.storage.read_bytes(item.ref), _ext(item.ref))
            except OSError as exc:
                yield item, exc


# -- webdataset ----------------------------------------------------------------------------------------


class WebDatasetSource(Source):
    """Existing tar shards (local or remote, `.tar` files under data.path or one .tar URL), re-sharded.

    Listing reads every tar once (validating its structure and collecting labels); shards keep the source
    order, so each output shard reads only the one or two input tars that hold its samples.
    """

    kind = "webdataset"
    sequential = True

    def __init__(self, storage: Storage, limit: int | None = None) -> None:
        self.storage = storage
        self.limit = limit
        root = storage.root
        if root.endswith(".tar"):
            self._tars = {root: storage.info(root)} if storage.exists(root) else {}
        elif storage.exists(root):
            self._tars = {u: i for u, i in storage.find(root).items() if u.endswith(".tar")}
        else:
            raise DataError(f"webdataset: {root} does not exist: set data.path to a folder of .tar shards")
        if not self._tars:
            raise DataError(f"webdataset: no .tar files at {root}: set data.path to a folder of .tar shards")
        self._labels_seen: set[int] = set()

    def fingerprint(self) -> str:
        listing = [(u, i.get("size"), i.get("ETag") or i.get("mtime")) for u, i in self._tars.items()]
        return _sha256(self.kind, listing, self.limit)

    def items(self) -> tuple[list[Item], list[Rejection]]:
        items, rejected = [], []
        for tar_url in self._tars:
            try:
                with self.storage.open(tar_url, "rb") as f:
                    for key, sample in iter_tar_samples(f, tar_url):
                        # The id goes into json and hashes: a non-UTF-8 key is written with \x escapes.
                        printable = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                        sid = f"{posixpath.basename(tar_url)}:{printable}"
                        if image_member(sample) is None:
                            rejected.append(Rejection(sid, f"no image member (has {sorted(sample)})"))
                            continue
                        label = (
                            int(sample["cls"]) if "cls" in sample and sample["cls"].strip().isdigit() else -1
                        )
                        items.append(Item(sid, "train", label, (tar_url, key)))
            except (DataError, OSError) as exc:
                rejected.append(Rejection(tar_url, f"unreadable tar after {len(items)} samples: {exc}"))
        if self.limit is not None:
            items = items[: self.limit]
        self._labels_seen = {i.label for i in items if i.label >= 0}
        return items, rejected

    def class_names(self) -> list[str] | None:
        return [str(i) for i in range(max(self._labels_seen) + 1)] if self._labels_seen else None

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        wanted: dict[str, dict[str, Item]] = {}
        for item in items:
            wanted.setdefault(item.ref[0], {})[item.ref[1]] = item
        for tar_url, by_key in wanted.items():
            found = 0
            try:
                with self.storage.open(tar_url, "rb") as f:
                    for key, sample in iter_tar_samples(f, tar_url):
                        item = by_key.get(key)
                        if item is not None:
                            ext = image_member(sample)
                            yield item, (sample[ext], ext)
                            found += 1
                            if found == len(by_key):
                                break
            except (DataError, OSError) as exc:
                yield from ((i, exc) for i in list(by_key.values())[found:])


def open_source(cfg: DataConfig, storage: Storage) -> Source:
    """The configured source; `storage` supplies the credentials for remote data.path URLs."""
    if cfg.source == "fashion-mnist":
        return FashionMNIST(cfg.path, cfg.limit)
    if cfg.source == "digits":
        return Digits(cfg.limit)
    if not cfg.path:
        raise DataError(f"data.path is required for data.source={cfg.source}: set it to a folder or URL")
    at = storage.at(re.sub(r"/+$", "", cfg.path) or cfg.path)
    if cfg.source == "imagefolder":
        return ImageFolder(at, cfg.limit)
    return WebDatasetSource(at, cfg.limit)
