"""Everything this package takes from the PatchGD engine, in one module.

Images are opened with the engine's own readers, so a dataset that validates here is read the
same way by training: Pillow through `open_image` (allowlist, pixel limit, full decode) and
tiled TIFF or whole-slide files through `open_region_reader`. When the engine's errors or
readers move, only this module changes.
"""

from __future__ import annotations

from worker.patchgd.data import (
    DEFAULT_MAX_PIXELS,
    SPLITS,
    ImageError,
    open_image,
    open_region_reader,
)

# Whole-slide formats read through OpenSlide: single-file formats only, since a dataset entry is
# one file (MRXS and VMS keep their pixels in a side folder), and TIFF-based ones only.
SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".scn", ".bif"})

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SLIDE_EXTENSIONS",
    "SPLITS",
    "ImageError",
    "open_image",
    "open_region_reader",
    "slide_properties",
]


def slide_properties(path: str) -> dict[str, str]:
    """OpenSlide's properties of a slide (vendor, `openslide.mpp-x`, ...); raises `ImageError`."""
    import openslide  # loads the native library; only slides need it

    try:
        with openslide.OpenSlide(path) as slide:
            return dict(slide.properties)
    except openslide.OpenSlideError as exc:
        raise ImageError(f"OpenSlide cannot read this slide ({exc})") from exc
