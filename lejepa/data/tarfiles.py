"""The tar files shards are made of: a WebDataset tar writer and reader, side by side.

A sample is the consecutive members that share a key, webdataset's convention (the key is everything before
the first dot of the file name): `key.png|jpg|...`, `key.cls` when labelled, `key.json`. The shard stage
writes them, the loaders and the webdataset source read them.

Both sides are small hand-written USTAR code rather than the standard library's `tarfile`, whose
per-member cost exceeds encoding or decoding a small PNG. The writer fixes every header field but the name
and the size (mode 0444, mtime 0), so equal samples give byte-equal shards. The reader checks every header
and raises one DataError, naming the file and the byte offset, for a damaged or truncated tar.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from lejepa.store.errors import DataError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
END_OF_ARCHIVE = bytes(1024)  # two zero blocks


# -- writing ---------------------------------------------------------------------------------------------


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
    """A USTAR member with fixed metadata (mode 0444, mtime 0), so equal input gives equal shards."""
    encoded, size = name.encode(), b"%011o\0" % len(data)
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(_TAR_HEADER)
    header[: len(encoded)] = encoded
    header[124:136] = size
    header[148:156] = b"%06o\0 " % (_TAR_HEADER_SUM + sum(encoded) + sum(size))
    return bytes(header) + data + bytes(-len(data) % 512)


class TarWriter:
    """Writes samples as a tar to a binary file, hashing and counting the bytes that pass through."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.num_bytes = f, hashlib.sha256(), 0

    def write_sample(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: a member `{key}.{extension}` for each (extension, data), in order."""
        self._write(b"".join(_tar_member(f"{key}.{ext}", data) for ext, data in members.items()))

    def finish(self) -> None:
        """The end-of-archive marker; the tar is complete once the file it writes to is closed."""
        self._write(END_OF_ARCHIVE)

    def _write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.num_bytes += len(data)
        self.f.write(data)


# -- reading ---------------------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is everything before the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _tar_number(field: bytes) -> int | None:
    """A header number: octal digits, or GNU base-256 for members over 8 GiB; None when it is neither."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits or b"0", 8) if re.fullmatch(rb"[0-7]*", digits) else None


def _tar_name(raw: bytes) -> str:
    # Tar names are bytes: a name that is not UTF-8 keeps its bytes as surrogates instead of failing.
    return raw.decode("utf-8", "surrogateescape")


def _tar_members(fileobj: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, with GNU long names and pax paths.

    A damaged header or a member cut short raises DataError naming `url` and the header's byte offset.
    """
    long_name, offset = None, 0

    def corrupt(what: str) -> DataError:
        return DataError(f"{url}: corrupt tar at byte {offset}: {what}")

    while True:
        header = fileobj.read(512)
        if len(header) < 512 or header == bytes(512):
            if header and header != bytes(512):
                raise corrupt(f"the file ends inside a header ({len(header)} of 512 bytes): truncated")
            return
        if _tar_number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise corrupt("header checksum mismatch")
        size, kind = _tar_number(header[124:136]), header[156:157]
        if size is None:
            raise corrupt(f"size field {header[124:136]!r} is not an octal number")
        data, padding = fileobj.read(size), -size % 512
        if len(data) < size or len(fileobj.read(padding)) < padding:
            raise corrupt(f"a {size}-byte member runs past the end of the file: truncated")
        offset += 512 + size + padding
        if kind == b"L":
            long_name = _tar_name(data.rstrip(b"\0"))
        elif kind == b"x":
            for record in data.split(b"\n"):
                field = record.split(b" ", 1)[-1]
                if field.startswith(b"path="):
                    long_name = _tar_name(field[5:])
        elif kind in (b"0", b"\0", b"7"):
            name = _tar_name(header[:100].rstrip(b"\0"))
            prefix = _tar_name(header[345:500].rstrip(b"\0")) if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        else:  # directories, links, global pax headers
            long_name = None


def iter_tar_samples(fileobj: Any, url: str = "tar stream") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar stream, members grouped by consecutive key.

    `url` names the stream in the DataError a corrupt or truncated tar raises.
    """
    key, sample = None, {}
    for name, data in _tar_members(fileobj, url):
        if posixpath.basename(name).startswith("__"):
            continue
        k, ext = _split_member(name)
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = data
    if sample:
        yield key, sample


def image_member(sample: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member, or None when it has none."""
    return next((ext for ext in sample if ext in IMAGE_EXTENSIONS), None)
