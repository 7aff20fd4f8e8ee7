"""Fixtures for tests and benchmarks: workloads and images of known content, kept out of the library.

``allocate_and_touch`` is a workload of exactly known size for checking memory measurement
(``measure_peak`` runs it in a child process, by reference or as
``"worker.patchgd.testing:allocate_and_touch"``); ``synthetic_region`` and ``write_pyramidal_tiff``
make whole-slide-like pyramidal TIFFs of any size whose every pixel is known without reading it.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

__all__ = [
    "SYNTHETIC_BLOCK",
    "allocate_and_touch",
    "level_colour",
    "synthetic_region",
    "write_pyramidal_tiff",
]


def allocate_and_touch(num_bytes: int, hold_s: float = 0.05) -> int:
    """Map `num_bytes` of fresh anonymous memory, write every page, hold it briefly: a workload of
    known size for checking the measurement itself (and for tests).

    An anonymous mapping, unlike a malloc'ed buffer, can never be served from memory the process
    already holds, so exactly `num_bytes` of new resident memory appear. A mapping the kernel
    refuses is reported as ``MemoryError``, like any failed allocation.
    """
    try:
        block = mmap.mmap(-1, num_bytes)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise MemoryError(f"cannot map {num_bytes:,} bytes") from exc
        raise
    with block:
        for offset in range(0, num_bytes, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(hold_s)
        return len(block)


SYNTHETIC_BLOCK = 64


def synthetic_region(downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels of the synthetic test slide at a level `downsample` times smaller than level 0.

    Level 0 is made of constant 64x64 blocks whose colour depends on the block position, so any
    power-of-two reduction up to 64 is again exact constant blocks: every level (and the BOX
    resize of any block-aligned region) can be computed without the level above it.
    """
    if SYNTHETIC_BLOCK % downsample:
        raise ValueError(f"downsample must divide {SYNTHETIC_BLOCK}")
    block = SYNTHETIC_BLOCK // downsample
    bx = np.arange(x // block, (x + w - 1) // block + 1)[None, :]
    by = np.arange(y // block, (y + h - 1) // block + 1)[:, None]
    colours = np.empty((by.shape[0], bx.shape[1], 3), np.uint8)
    colours[:, :, 0] = (bx * 53 + by * 7) % 256
    colours[:, :, 1] = (by * 97 + bx * 3) % 256
    colours[:, :, 2] = ((bx ^ by) * 29) % 256
    # Expand the per-block colours to pixels with two gathers (cheap next to per-pixel arithmetic).
    cols = np.arange(x, x + w) // block - x // block
    rows = np.arange(y, y + h) // block - y // block
    return colours.take(cols, axis=1).take(rows, axis=0)


def level_colour(downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A `tile_fn` for `write_pyramidal_tiff` that paints level L (downsample 2**L) the constant
    grey 10 * (L + 1): whatever is read from a level says which level it was."""
    level = downsample.bit_length() - 1
    return np.full((h, w, 3), 10 * (level + 1), np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    size: int | tuple[int, int],
    *,
    tile: int = 256,
    levels: int | None = None,
    tile_fn: Callable[[int, int, int, int, int], np.ndarray] = synthetic_region,
    compression: str | None = "zlib",
    mpp: float | None = None,
) -> Path:
    """Write a tiled pyramidal RGB TIFF tile by tile, so memory stays flat at any size.

    Level L is 2**L times smaller than level 0 and is stored as a reduced-resolution page
    (SubfileType 1), which both tifffile and OpenSlide's generic TIFF reader understand.
    `tile_fn(downsample, x, y, w, h)` produces each tile (default: `synthetic_region`). Without
    `levels`, halves the image while it stays >= one tile (at most 7 levels). `mpp` (µm per pixel
    of level 0) writes resolution tags in pixels per centimetre on every level (scaled by its
    downsample).
    """
    width, height = (size, size) if isinstance(size, int) else size
    if tile % 16:
        raise ValueError("tile must be a multiple of 16 (TIFF requirement)")
    if levels is None:
        levels = 1
        while levels < 7 and min(width, height) >> levels >= tile:
            levels += 1
    target = Path(path)

    def tiles(downsample: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                tw, th = min(tile, lw - tx), min(tile, lh - ty)
                block = tile_fn(downsample, tx, ty, tw, th)
                if (tw, th) != (tile, tile):
                    padded = np.zeros((tile, tile, 3), np.uint8)
                    padded[:th, :tw] = block
                    block = padded
                yield block

    extra = {"compressionargs": {"level": 1}} if compression == "zlib" else {}
    with tifffile.TiffWriter(target, bigtiff=width * height * 3 > (1 << 31)) as writer:
        for level in range(levels):
            downsample = 1 << level
            lw, lh = max(1, width // downsample), max(1, height // downsample)
            if mpp is not None:
                per_cm = 10000 / (mpp * downsample)
                extra = {**extra, "resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            writer.write(
                tiles(downsample, lw, lh),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=1 if level else 0,
                **extra,
            )
    return target
