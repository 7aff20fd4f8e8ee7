"""The limits an upload is held to: every one a parameter, with defaults the web side maps to settings."""

from __future__ import annotations

from dataclasses import dataclass

from .engine import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DatasetLimits:
    """What an uploaded dataset may contain.

    Archive limits are enforced while the archive streams: bytes are counted as they are
    decompressed (declared sizes are never trusted) and extraction stops at the first limit.
    """

    # Archive: total uncompressed bytes, entries (files, folders, anything), compression ratio.
    max_total_bytes: int = 64 << 30
    max_files: int = 100_000
    # Decompressed / compressed bytes read so far, checked once `ratio_grace_bytes` are out:
    # photos and slides compress 1-10x; zip bombs 1,000x and more.
    max_compression_ratio: float = 200.0
    ratio_grace_bytes: int = 16 << 20
    max_path_length: int = 1024
    max_path_depth: int = 32
    # One tar header (pax or GNU long-name records included): real ones are a few hundred bytes.
    max_header_bytes: int = 1 << 20
    # Images: pixels of an image decoded whole (PNG, JPEG, small TIFF), and of level 0 of a
    # slide or pyramidal TIFF (read by header, never decoded whole).
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_slide_pixels: int = 1 << 36
    # Pages (IFDs) of one TIFF: pyramids and slides have a few dozen at most.
    max_tiff_pages: int = 1024
    # A slide's thumbnail is read from its smallest level, if that level is at most this big.
    max_thumbnail_source_pixels: int = 1 << 25
    thumbnails_per_class: int = 4
    thumbnail_size: int = 256
    # Problems listed one by one; past this, one more line says how many were left out.
    max_problems: int = 1000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_compression_ratio < 1:
            raise ValueError("max_compression_ratio must be at least 1")
