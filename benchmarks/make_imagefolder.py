"""Write a synthetic JPEG ImageFolder (class folders of smooth random colour images) for GPU data benchmarks.

    python benchmarks/make_imagefolder.py DIR [--count 2560] [--classes 10] [--size 256]

The images cost what real photos of that size cost to decode; their content does not matter to a speed
benchmark. Deterministic for a given count, class count and size.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, index: int, size: int) -> None:
    rng = np.random.default_rng(index)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-24, 25, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int, default=2560)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    paths = [args.root / f"class{i % args.classes:02d}" / f"{i:06d}.jpg" for i in range(args.count)]
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_image, paths, range(args.count), [args.size] * args.count, chunksize=64))
    print(f"wrote {args.count} JPEGs of {args.size} px in {args.classes} classes under {args.root}")


if __name__ == "__main__":
    main()
