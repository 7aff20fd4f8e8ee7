"""Builders for the dataset validation tests: every file is made in the test, nothing is committed.

The only engine import of these tests is here (`write_pyramidal_tiff`), so it moves in one place.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from worker.patchgd.testing import write_pyramidal_tiff

__all__ = ["write_pyramidal_tiff"]


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    """A small noisy RGB image (noise so that JPEG files are not trivially short)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` but holds one row of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_entries(
    classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3, prefix: str = ""
) -> dict[str, bytes]:
    """`<prefix><class>/<i>.png` entries of a valid class-folder dataset."""
    return {
        f"{prefix}{name}/{i}.png": image_bytes("PNG", (32 + i, 24 + c), seed=c * 100 + i)
        for c, name in enumerate(classes)
        for i in range(per_class)
    }


def write_zip(path: Path, entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def zip_with_info(path: Path, infos: list[tuple[zipfile.ZipInfo, bytes]], base: dict[str, bytes]) -> Path:
    """A zip of `base` entries plus entries with hand-set ZipInfo (mode bits, flags)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in base.items():
            archive.writestr(name, data)
        for info, data in infos:
            archive.writestr(info, data)
    return path


def tar_member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def write_tar(
    path: Path,
    entries: dict[str, bytes],
    *,
    mode: str = "w:gz",
    extra: list[tuple[tarfile.TarInfo, bytes]] = (),
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    with tarfile.open(path, mode, format=fmt) as archive:
        for name, data in entries.items():
            info, payload = tar_member(name, data)
            archive.addfile(info, io.BytesIO(payload))
        for info, payload in extra:
            archive.addfile(info, io.BytesIO(payload) if info.size else None)
    return path


def tar_gz_of_many_entries(path: Path, entries: int, per_member: int = 10_000) -> Path:
    """A tar.gz of `entries` directory entries, built cheaply: one gzip member of `per_member`
    identical 512-byte headers is compressed once and repeated (gzip members concatenate)."""
    info = tarfile.TarInfo("d")
    info.type = tarfile.DIRTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = compressor.compress(header * per_member) + compressor.flush()
    with open(path, "wb") as fh:
        for _ in range(entries // per_member):
            fh.write(member)
        end = zlib.compressobj(9, zlib.DEFLATED, 31)
        fh.write(end.compress(b"\0" * 1024) + end.flush())
    return path


def patch_bytes(path: Path, old: bytes, new: bytes, count: int = -1) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, count))


def tree(root: Path) -> set[str]:
    """Every path under `root` (relative), to see what a run left behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def write_tiff(path: Path, size: int, *, tile: int = 32, mpp: float | None = None) -> Path:
    """A small tiled RGB TIFF (optionally with resolution tags in pixels per centimetre)."""
    import tifffile

    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    extra = {}
    if mpp is not None:
        extra = {"resolution": (10000 / mpp, 10000 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, pixels, tile=(tile, tile), photometric="rgb", compression="zlib", **extra)
    return path


def file_size(path: Path) -> int:
    return os.path.getsize(path)


def write_svs(path: Path, size: int = 512, *, mpp: float = 0.499) -> Path:
    """A small two-level Aperio SVS (what OpenSlide reads as vendor 'aperio', with µm/px)."""
    import tifffile

    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    head = (
        f"Aperio Image Library v12.0.15\r\n{size}x{size} [0,0 {size}x{size}] (256x256) RGB"
        f"|AppMag = 20|MPP = {mpp}"
    )
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            pixels, tile=(256, 256), photometric="rgb", compression="zlib", description=head, metadata=None
        )
        writer.write(
            np.ascontiguousarray(pixels[::2, ::2]),
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            description=f"Aperio Image Library v12.0.15\r\n{size}x{size} -> {size // 2}x{size // 2} |",
            metadata=None,
        )
    return path


def codes(report) -> list[tuple[str, str]]:
    """(path, code) of every problem of a report."""
    return [(p.path, p.code) for p in report.problems]
