"""Check one image file: format by content, pixel limit, decodability; size, pyramid levels, µm/px.

Ordinary images (PNG, JPEG, and TIFF small enough to decode) are decoded whole, so truncated or
corrupt data is found now rather than in the middle of training. Slides and large pyramidal
TIFFs are checked by their header (every tile offset inside the file) and by reading their
smallest level for the thumbnail; their full-resolution pixels are never decoded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from .engine import SLIDE_EXTENSIONS, ImageError, open_image, open_region_reader, slide_properties
from .limits import DatasetLimits
from .problems import Problem, problem

# Extension -> the format its content must have.
EXPECTED_KIND: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    **{ext: "TIFF" for ext in SLIDE_EXTENSIONS},
}
IMAGE_SUFFIXES = frozenset(EXPECTED_KIND)

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"8BPS", "a Photoshop document"),
    (b"\x7fELF", "an executable"),
    (b"MZ", "a Windows executable"),
)


def sniff(head: bytes) -> str:
    """What the first bytes of a file say it is: an allowed format name or a readable description."""
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[257:262] == b"ustar":
        return "a tar archive"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if text.startswith((b"<?xml", b"<svg")):
        return "an XML/SVG document"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "data of an unknown format"


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about one image."""

    format: str
    width: int
    height: int
    levels: tuple[tuple[int, int], ...]
    mpp: tuple[float, float] | None


class ImageProblem(Exception):
    """An image that cannot be used; `problem` says why and how to fix it."""

    def __init__(self, item: Problem) -> None:
        super().__init__(item.message)
        self.problem = item


def _fail(rel: str, code: str, message: str) -> ImageProblem:
    return ImageProblem(problem(rel, code, message))


def _tiff_mpp(page) -> tuple[float, float] | None:
    """µm per pixel from the TIFF resolution tags (pixels per inch or per centimetre)."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    x, y = tags.get("XResolution"), tags.get("YResolution")
    if unit is None or x is None or y is None:
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if per_unit is None:
        return None
    values = []
    for tag in (x, y):
        numerator, denominator = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if not numerator or not denominator:
            return None
        values.append(per_unit * denominator / numerator)
    return values[0], values[1]


def _tiff_header(
    path: Path, rel: str, size: int, max_pages: int
) -> tuple[tuple[tuple[int, int], ...], tuple[float, float] | None]:
    """Pyramid level sizes and µm/px from a TIFF header; every tile must lie inside the file."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pages = [level.keyframe for level in series.levels]
            for number, page in enumerate(tif.pages):
                if number >= max_pages:
                    raise _fail(
                        rel,
                        "unsupported_tiff",
                        f"has more than {max_pages:,} pages (a pyramid has a few dozen)",
                    )
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                    if count and offset + count > size:
                        raise _fail(
                            rel,
                            "corrupt_image",
                            f"TIFF page {number} has image data at bytes {offset:,}-{offset + count:,}, "
                            f"past the end of the {size:,}-byte file (truncated or damaged)",
                        )
            levels = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
            return levels, _tiff_mpp(tif.pages[0])
    except ImageProblem:
        raise
    except Exception as exc:  # tifffile raises many kinds on malformed headers
        raise _fail(rel, "corrupt_image", f"not a readable TIFF ({exc})") from exc


def _save_thumbnail(image: Image.Image, target: Path, size: int) -> None:
    """Shrink `image` in place (its pixels are not needed afterwards) and save it as a JPEG."""
    image.thumbnail((size, size), Image.Resampling.BOX)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(target, "JPEG", quality=85)


def _region_thumbnail(reader, limits: DatasetLimits, target: Path | None) -> None:
    """Read the smallest level whole (decoding its tiles checks them) and save it as the thumbnail."""
    smallest = min(
        range(len(reader.level_dimensions)),
        key=lambda i: reader.level_dimensions[i][0] * reader.level_dimensions[i][1],
    )
    width, height = reader.level_dimensions[smallest]
    if width * height > limits.max_thumbnail_source_pixels:
        return
    reader.set_level(smallest)
    pixels = reader.read_region(0, 0, width, height)
    if target is not None:
        _save_thumbnail(Image.fromarray(np.asarray(pixels, dtype=np.uint8)), target, limits.thumbnail_size)


def check_image(path: Path, rel: str, limits: DatasetLimits, thumbnail: Path | None = None) -> ImageInfo:
    """Check one image (see the module docstring); raises `ImageProblem`. Writes `thumbnail` if given."""
    suffix = path.suffix.lower()
    expected = EXPECTED_KIND.get(suffix)
    if expected is None:
        raise _fail(
            rel,
            "unsupported_format",
            f"{suffix or 'a file without extension'} is not a supported image format",
        )
    size = path.stat().st_size
    if size == 0:
        raise _fail(rel, "empty_file", "the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(512)
    kind = sniff(head)
    if kind != expected:
        raise _fail(rel, "content_mismatch", f"named {suffix} but the content is {kind}, not {expected}")
    if suffix in SLIDE_EXTENSIONS:
        return _check_slide(path, rel, size, limits, thumbnail)
    if kind == "TIFF":
        levels, mpp = _tiff_header(path, rel, size, limits.max_tiff_pages)
        width, height = levels[0]
        if width * height > limits.max_pixels:
            return _check_large_tiff(path, rel, levels, mpp, limits, thumbnail)
    else:
        levels, mpp = (), None
        _check_header_pixels(path, rel, limits)
    try:
        image = open_image(path, max_pixels=limits.max_pixels)
    except ImageError as exc:
        raise _fail(rel, "corrupt_image", _strip_name(str(exc), path.name)) from exc
    width, height = image.size
    if thumbnail is not None:
        _save_thumbnail(image, thumbnail, limits.thumbnail_size)
    return ImageInfo(format=kind, width=width, height=height, levels=levels or ((width, height),), mpp=mpp)


def _strip_name(message: str, name: str) -> str:
    return message[len(name) + 2 :] if message.startswith(f"{name}: ") else message


def _check_header_pixels(path: Path, rel: str, limits: DatasetLimits) -> None:
    """The pixel count from the header, before anything is decoded (decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        raise _fail(rel, "image_too_large", f"refused as a possible decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _fail(rel, "corrupt_image", f"the image header cannot be read ({exc})") from exc
    if width * height > limits.max_pixels:
        raise _fail(
            rel,
            "image_too_large",
            f"declares {width:,}x{height:,} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (possible decompression bomb)",
        )


def _check_large_tiff(path, rel, levels, mpp, limits, thumbnail) -> ImageInfo:
    width, height = levels[0]
    if width * height > limits.max_slide_pixels:
        raise _fail(
            rel,
            "image_too_large",
            f"{width:,}x{height:,} pixels is over the limit of {limits.max_slide_pixels:,}",
        )
    try:
        with open_region_reader(path, backend="tifffile", max_pixels=limits.max_slide_pixels) as reader:
            _region_thumbnail(reader, limits, thumbnail)
    except ImageError as exc:
        raise _reader_problem(rel, _strip_name(str(exc), path.name)) from exc
    except Exception as exc:  # a tile that does not decode
        raise _fail(rel, "corrupt_image", f"a tile of the smallest level cannot be decoded ({exc})") from exc
    return ImageInfo(format="TIFF", width=width, height=height, levels=levels, mpp=mpp)


def _reader_problem(rel: str, message: str) -> ImageProblem:
    """The engine's streaming reader refuses a TIFF: too large, unreadable, or a kind it cannot stream."""
    if "exceeds the limit" in message:
        return _fail(rel, "image_too_large", message)
    if "not a readable TIFF" in message:
        return _fail(rel, "corrupt_image", message)
    return _fail(rel, "unsupported_tiff", message)


def _check_slide(path: Path, rel: str, size: int, limits: DatasetLimits, thumbnail: Path | None) -> ImageInfo:
    """A whole-slide file: tile offsets from the TIFF header, then OpenSlide (levels, µm/px, thumbnail)."""
    _tiff_header(path, rel, size, limits.max_tiff_pages)
    try:
        properties = slide_properties(os.fspath(path))
        with open_region_reader(path, backend="openslide", max_pixels=limits.max_slide_pixels) as reader:
            levels = reader.level_dimensions
            _region_thumbnail(reader, limits, thumbnail)
    except ImageError as exc:
        message = _strip_name(str(exc), path.name)
        code = "image_too_large" if "exceeds the limit" in message else "unreadable_slide"
        raise _fail(rel, code, message) from exc
    except Exception as exc:
        raise _fail(rel, "unreadable_slide", f"OpenSlide cannot read the slide ({exc})") from exc
    mpp = None
    with contextlib.suppress(KeyError, ValueError):
        mpp = (float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"]))
    vendor = properties.get("openslide.vendor", "slide").upper()
    width, height = levels[0]
    return ImageInfo(format=vendor, width=width, height=height, levels=tuple(levels), mpp=mpp)
