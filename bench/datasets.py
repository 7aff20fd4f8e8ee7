"""Dataset validation at work: how fast a good archive is checked, and how fast hostile ones are refused.

    python -m bench.datasets                    # the scenarios behind docs/datasets.md
    python -m bench.datasets --images 500 --name quick

Scenarios (each in a fresh temporary folder, removed afterwards):
- a zip of small JPEGs in class folders: extraction + full decode of every image (files/s);
- a zip of tiled pyramidal TIFFs checked by header and smallest level (their level 0 is never decoded);
- a tar.gz of 1,000,000 entries refused at the default count cap (100,000) (with the default
  ratio it is refused even sooner: its headers compress more than 200x);
- a zip bomb (one entry of zeros) refused by the compression ratio, with the bytes it got to expand.
"""

from __future__ import annotations

import argparse
import io
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import machine, print_table, write_json
from tests.datasets_worker.builders import tar_gz_of_many_entries, write_pyramidal_tiff
from worker.datasets import DatasetLimits, validate_upload


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _run(upload: Path, work: Path, limits: DatasetLimits | None = None) -> tuple[float, float, Any]:
    """Wall and CPU seconds of one validation (CPU time is less disturbed by a shared machine)."""
    started, cpu = time.perf_counter(), time.process_time()
    report = validate_upload(upload, work / "dataset", limits=limits)
    return time.perf_counter() - started, time.process_time() - cpu, report


def jpeg_archive(work: Path, images: int, size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    upload = work / "jpegs.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as archive:
        for i in range(images):
            archive.writestr(f"class{i % 4}/{i:06d}.jpg", _jpeg(rng, size))
    seconds, cpu_seconds, report = _run(upload, work)
    assert report.ready, report.problems[:3]
    return {
        "scenario": f"{images} JPEGs {size}x{size} (zip)",
        "outcome": report.status,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "files_per_cpu_s": round(images / cpu_seconds, 1),
        "archive_mib": round(upload.stat().st_size / 2**20, 1),
    }


def pyramid_archive(work: Path, slides: int, size: int) -> dict[str, Any]:
    source = work / "src"
    source.mkdir()
    upload = work / "pyramids.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as archive:
        for i in range(slides):
            path = write_pyramidal_tiff(source / f"{i}.tif", size, tile=256)
            archive.write(path, f"class{i % 2}/{i}.tif")
            path.unlink()
    # The default in-memory limit (about 9459^2) is above these slides' level 0 only when small;
    # a limit of 4096^2 makes every one of them a streamed (header + smallest level) check.
    seconds, cpu_seconds, report = _run(upload, work, DatasetLimits(max_pixels=4096 * 4096))
    assert report.ready, report.problems[:3]
    return {
        "scenario": f"{slides} pyramidal TIFFs {size}x{size} (zip)",
        "outcome": report.status,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "files_per_cpu_s": round(slides / cpu_seconds, 2),
        "archive_mib": round(upload.stat().st_size / 2**20, 1),
        "levels": len(report.pyramids[0]["levels"]),
    }


def million_entries(work: Path) -> dict[str, Any]:
    upload = tar_gz_of_many_entries(work / "million.tar.gz", 1_000_000)
    # Its 512-byte headers compress far beyond the default ratio, which would refuse it first;
    # the ratio is lifted here so that the row shows the count cap at work.
    seconds, cpu_seconds, report = _run(upload, work, DatasetLimits(max_compression_ratio=1e9))
    return {
        "scenario": "tar.gz of 1,000,000 entries (default cap 100,000, ratio lifted)",
        "outcome": report.problems[0].code,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "archive_mib": round(upload.stat().st_size / 2**20, 1),
        "detail": report.problems[0].message,
    }


def zip_bomb(work: Path, gib: int) -> dict[str, Any]:
    upload = work / "bomb.zip"
    with (
        zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("a/zeros.png", "w", force_zip64=True) as fh,
    ):
        chunk = b"\0" * (64 << 20)
        for _ in range(gib * 16):
            fh.write(chunk)
    seconds, cpu_seconds, report = _run(upload, work)
    expanded = int(re.search(r"expanded to ([\d,]+)", report.problems[0].message).group(1).replace(",", ""))
    return {
        "scenario": f"zip bomb: {gib} GiB of zeros (default ratio 200x)",
        "outcome": report.problems[0].code,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "archive_mib": round(upload.stat().st_size / 2**20, 2),
        "expanded_mib": round(expanded / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--bomb-gib", type=int, default=4)
    parser.add_argument("--name", default="datasets")
    args = parser.parse_args()
    if args.slides < 4 or args.images < 4:
        parser.error("--slides and --images must be at least 4 (two classes of two images at least)")

    rows = []
    scenarios = [
        lambda w: jpeg_archive(w, args.images, args.image_size),
        lambda w: pyramid_archive(w, args.slides, args.slide_size),
        million_entries,
        lambda w: zip_bomb(w, args.bomb_gib),
    ]
    for scenario in scenarios:
        with tempfile.TemporaryDirectory() as folder:
            rows.append(scenario(Path(folder)))
            print_table(rows[-1:], list(rows[-1]))
    path = write_json(args.name, {"benchmark": "datasets", "machine": machine("cpu"), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
