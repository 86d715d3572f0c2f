"""A minimal lossless PNG encoder: how the shard stage stores a source's raw pixels.

Its own module because it is neither the tar format (a shard keeps a source's encoded bytes as they are, in
whatever format they came; only raw pixels, such as fashion-mnist's, are encoded) nor the shard stage's
logic: it is a pure function of the pixels. Written by hand because Pillow's per-call overhead exceeds
the encoding of a 28x28 image.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def encode_png(pixels: np.ndarray, level: int) -> bytes:
    """Lossless PNG of (H, W) grey or (H, W, 3) RGB uint8 pixels, compressed with zlib `level`."""
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
