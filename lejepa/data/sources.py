"""Image sources the shard stage reads: fashion-mnist, digits, imagefolder, webdataset, huggingface.

A source lists its samples once (`items`, cheap: names and labels, no pixels) and then reads any subset of
them (`read`), so the shard stage can split the work into independent groups. A read yields either raw
pixels (a uint8 array, encoded to PNG once by the shard writer) or the source's encoded bytes, which are
kept as they are; a sample that cannot be read yields the exception, and the writer records it as rejected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import gzip
import hashlib
import itertools
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lejepa.config import DataConfig
from lejepa.data.tarfiles import image_member, iter_tar_samples
from lejepa.store.errors import DataError
from lejepa.store.storage import Storage, StorageError

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


def _version_of(info: dict[str, Any]) -> Any:
    """What changes when a listed file changes: S3's ETag, a local mtime, the hub's git blob id."""
    return info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("blob_id")


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
        listing = [(self._rel(u), i.get("size"), _version_of(i)) for u, i in self._files.items()]
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
        listing = [(u, i.get("size"), _version_of(i)) for u, i in self._tars.items()]
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


# -- huggingface ---------------------------------------------------------------------------------------


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (imported for the attribute)
    except ImportError:
        raise DataError(
            "data.source=huggingface needs pyarrow: pip install 'lejepa-pipeline[huggingface]'"
        ) from None
    return pyarrow


@functools.lru_cache(maxsize=256)
def _mapped_table(path: str, version: Any) -> Any:
    """A local Arrow stream file as a table whose buffers are memory-mapped: random access reads only the
    rows asked for, and nothing is copied into memory. Cached, so each worker process maps a file once;
    `version` (its size and mtime) keys the cache, so a file rewritten in place is mapped again."""
    pa = _pyarrow()
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


class HuggingFaceSource(Source):
    """A Hugging Face dataset: a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict),
    or Parquet files (a folder of them, one file, or a glob such as `data/train-*.parquet`), local or remote,
    hub included: `hf://datasets/OWNER/NAME` through huggingface_hub's fsspec filesystem.

    Read with pyarrow one record batch (Parquet: one row group) at a time, never a whole dataset. Images come
    from `image_column` (an `Image` feature, or encoded image bytes), labels from `label_column` (a
    `ClassLabel`, integers or strings; None: unlabelled). A sample's id is `{split}/{row}`, rows numbered
    across the split's files in order, so splits follow the stable hash of the other sources. A DatasetDict's
    `test` split, and Parquet files named `test-*` or in a `test/` folder, stay the test split; every other
    split is train (val is held out of it by hash).

    Local Arrow files are memory-mapped and read in any order, so shards are shuffled as for an image folder;
    Parquet (and remote Arrow) is read in order, as tar shards are, and shards keep the dataset's order.
    """

    kind = "huggingface"

    def __init__(
        self,
        storage: Storage,
        image_column: str = "image",
        label_column: str | None = None,
        limit: int | None = None,
    ) -> None:
        self.storage = storage
        self.image_column, self.label_column, self.limit = image_column, label_column, limit
        self._files = self._locate()
        if not self._files:  # save_to_disk writes no Arrow file for an empty dataset
            raise self._no_rows()
        self._versions = {url: (info.get("size"), _version_of(info)) for url, _, info in self._files}
        self.parquet = self._files[0][0].endswith(".parquet")
        self.sequential = self.parquet or storage.protocol != "file"
        schema = self._schema(self._files[0][0])
        # datasets records its features (ClassLabel names among them) in the schema's metadata.
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {})
        self._features: dict[str, Any] = info.get("features", {})
        self._check_columns(schema, self._files[0][0])
        self._classes: list[str] | None = None

    def _locate(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(file URL, source split, fsspec info) of every data file, in reading order."""
        storage, root = self.storage, self.storage.root
        where, base = f"huggingface: {root}", root
        if any(c in root for c in "*?["):
            base = root[: min(root.index(c) for c in "*?[" if c in root)].rsplit("/", 1)[0]
            listing = storage.find(base) if storage.exists(base) else {}
            found = {u: i for u, i in listing.items() if fnmatch.fnmatchcase(u, root)}
            if not found:
                raise DataError(f"{where} matches no files: set data.path to Parquet files or a folder")
        elif not storage.exists(root):
            raise DataError(
                f"{where} does not exist: set data.path to a save_to_disk folder, Parquet files, or "
                "hf://datasets/OWNER/NAME"
            )
        elif storage.exists(f"{root}/dataset_dict.json"):  # a DatasetDict: one Dataset folder per split
            return [
                (url, "test" if split == "test" else "train", info)
                for split in storage.read_json(f"{root}/dataset_dict.json")["splits"]
                for url, info in self._arrow_files(f"{root}/{split}")
            ]
        elif storage.exists(f"{root}/state.json"):
            return [(url, "train", info) for url, info in self._arrow_files(root)]
        elif root.endswith(".parquet"):
            found, base = {root: storage.info(root)}, posixpath.dirname(root)
        else:
            found = storage.find(root)
        files = [(u, i) for u, i in found.items() if u.endswith(".parquet")]
        if not files:
            raise DataError(
                f"{where} holds no .parquet files and no save_to_disk dataset (state.json or "
                "dataset_dict.json): set data.path to one of them"
            )
        # The hub's layouts: data/test-00000-of-00001.parquet, or a test/ folder of the Parquet conversion.
        test = re.compile(r"(^|/)test([-_./]|$)")
        return [(u, "test" if test.search(u[len(base) :]) else "train", i) for u, i in files]

    def _no_rows(self) -> DataError:
        return DataError(
            f"huggingface: {self.storage.root} has no rows: set data.path to a dataset with images"
        )

    def _arrow_files(self, folder: str) -> list[tuple[str, dict[str, Any]]]:
        """The Arrow files of one saved Dataset, in the order its state.json lists them."""
        state = self.storage.read_json(f"{folder}/state.json")
        urls = [f"{folder}/{f['filename']}" for f in state["_data_files"]]
        return [(url, self.storage.info(url)) for url in urls]

    @contextlib.contextmanager
    def _open(self, url: str) -> Iterator[Any]:
        pa = _pyarrow()
        if self.storage.protocol == "file":
            with pa.memory_map(url) as f:
                yield f
        else:
            with self.storage.open(url, "rb") as f:
                yield f

    def _schema(self, url: str) -> Any:
        pa = _pyarrow()
        with self._open(url) as f:
            return pa.parquet.ParquetFile(f).schema_arrow if self.parquet else pa.ipc.open_stream(f).schema

    def _check_columns(self, schema: Any, url: str) -> None:
        pa = _pyarrow()
        columns = ", ".join(schema.names)
        for column, what in ((self.image_column, "image"), (self.label_column, "label")):
            if column is not None and column not in schema.names:
                raise DataError(
                    f"huggingface: {url} has no column '{column}' (columns: {columns}): "
                    f"set data.{what}_column to the one that holds the {what}s"
                )
        kind = schema.field(self.image_column).type
        image_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
        if not (image_struct or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise DataError(
                f"huggingface: column '{self.image_column}' of {url} holds {kind}, not images: set "
                f"data.image_column to an Image column (columns: {columns})"
            )
        if self.label_column is not None:
            kind = schema.field(self.label_column).type
            if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(
                    f"huggingface: column '{self.label_column}' of {url} holds {kind}, not class labels: "
                    "set data.label_column to a ClassLabel, integer or string column, or unset it"
                )

    def _batches(
        self, url: str, columns: list[str], first: int = 0, last: int | None = None
    ) -> Iterator[tuple[int, Any]]:
        """(number of its first row, record batch of `columns`) for the batches of one file that hold a row
        in [first, last]; Parquet reads only those row groups, an Arrow stream stops after `last`."""
        pa = _pyarrow()
        with self._open(url) as f:
            if self.parquet:
                parquet = pa.parquet.ParquetFile(f)
                self._check_columns(parquet.schema_arrow, url)
                start = 0
                for group in range(parquet.num_row_groups):
                    end = start + parquet.metadata.row_group(group).num_rows
                    if end > first and (last is None or start <= last):
                        # Small batches: a batch of images is held in memory while it is written.
                        batches = parquet.iter_batches(batch_size=256, row_groups=[group], columns=columns)
                        for batch in batches:
                            yield start, batch
                            start += batch.num_rows
                    start = end
                return
            reader = pa.ipc.open_stream(f)
            self._check_columns(reader.schema, url)
            start = 0
            for batch in reader:
                end = start + batch.num_rows
                if end > first:
                    yield start, batch.select(columns)
                if last is not None and end > last:
                    return
                start = end

    def fingerprint(self) -> str:
        listing = [(u, s, self._versions[u]) for u, s, _ in self._files]
        return _sha256(self.kind, listing, self.image_column, self.label_column, self.limit)

    def _label_names(self, labels: list[Any]) -> list[str] | None:
        feature = self._features.get(self.label_column, {})
        if feature.get("_type") == "ClassLabel":
            return list(feature["names"])
        if any(isinstance(y, str) for y in labels):
            return sorted({y for y in labels if y is not None})
        seen = [y for y in labels if y is not None and y >= 0]
        return [str(i) for i in range(max(seen) + 1)] if seen else None

    def items(self) -> tuple[list[Item], list[Rejection]]:
        items: list[Item] = []
        labels: list[Any] = []
        rows = Counter()  # per source split
        for url, split, _ in self._files:
            columns = [self.label_column] if self.label_column else []
            for start, batch in self._batches(url, columns):
                values = batch.column(0).to_pylist() if columns else [None] * batch.num_rows
                for offset, label in enumerate(values):
                    if self.limit is None or rows[split] < self.limit:
                        items.append(Item(f"{split}/{rows[split]}", split, -1, (url, start + offset)))
                        labels.append(label)
                    rows[split] += 1
        if not items:
            raise self._no_rows()
        if self.label_column is None:
            return items, []
        self._classes = self._label_names(labels)
        index = {name: i for i, name in enumerate(self._classes or [])}
        return [
            dataclasses.replace(item, label=index[y] if isinstance(y, str) else -1 if y is None else int(y))
            for item, y in zip(items, labels, strict=True)
        ], []

    def class_names(self) -> list[str] | None:
        return self._classes

    def _payload(self, value: Any) -> Payload:
        """A cell of the image column as (encoded bytes, extension), or why it is no image."""
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            data, path = value.get("bytes"), value.get("path") or ""
            # An image stored by reference: its file, beside the dataset or absolute.
            if data is None and path:
                try:
                    data = self.storage.read_bytes(path)
                except (OSError, StorageError) as exc:
                    return exc
        else:
            data, path = value, ""
        if data is None:
            return DataError(f"no image in column '{self.image_column}'")
        return bytes(data), _ext(path)

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        if not self.sequential:  # memory-mapped: any row, in the shard's own (shuffled) order
            for item in items:
                url, row = item.ref
                table = _mapped_table(url, self._versions[url])
                yield item, self._payload(table.column(self.image_column)[row].as_py())
            return
        # In order: each file's rows are ascending, so one pass over the batches that hold them.
        for url, group in itertools.groupby(items, key=lambda it: it.ref[0]):
            wanted = list(group)
            rows = iter(wanted)
            item = next(rows, None)
            for start, batch in self._batches(url, [self.image_column], wanted[0].ref[1], wanted[-1].ref[1]):
                column = batch.column(0)
                while item is not None and item.ref[1] < start + batch.num_rows:
                    yield item, self._payload(column[item.ref[1] - start].as_py())
                    item = next(rows, None)


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
    if cfg.source == "huggingface":
        return HuggingFaceSource(at, cfg.image_column, cfg.label_column, cfg.limit)
    return WebDatasetSource(at, cfg.limit)
