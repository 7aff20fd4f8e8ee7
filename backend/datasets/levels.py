"""The pyramid levels a dataset can be trained from, as validation recorded them.

Validation records, per pyramidal image (and per image with a known µm/px), the size of every
level and the µm/px of level 0 (``pyramids`` in the report). A dataset offers level ``L`` when every
one of its images has an ``L``-th level: an image without a pyramid has level 0 only, so a dataset
that mixes pyramids with flat images, or slides with different level counts, offers the levels all
of them have. Level ``L`` means each image's own ``L``-th level, so its size and µm/px may differ
between images (a range is given); its µm/px is level 0's times the level's downsample.
"""

from __future__ import annotations

from typing import Any


def _span(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def level_table(
    pyramids: list[dict[str, Any]], image_count: int, image_stats: dict[str, Any]
) -> dict[str, Any]:
    """The levels every image of a dataset has.

    ``pyramids``: the report's entries (``levels``: ``[[w, h], ...]``, ``mpp``: ``[x, y]`` or null)
    of ALL its pyramidal images; ``image_count``: how many images the dataset has; ``image_stats``:
    the report's size statistics (level 0 of a dataset without pyramids). Returns ``count`` (the
    levels offered), ``pyramidal`` (``count > 1``), ``mpp_known`` (every image has a µm/px),
    ``differing`` (the images have different level counts) and ``levels``: per level ``level``,
    ``width`` and ``height`` (``[min, max]`` px), ``downsample`` (``[min, max]`` against level 0),
    ``mpp`` (``[min, max]`` µm/px, null unless every image has one), ``max_pixels`` (of the largest
    image at that level) and ``physical_um`` (``[min, max]`` width of the images in µm, or null).
    """
    entries = [p for p in pyramids if isinstance(p.get("levels"), list) and p["levels"]]
    pyramidal = [p for p in entries if len(p["levels"]) > 1]
    counts = [len(p["levels"]) for p in entries]
    flat_images = max(0, image_count - len(pyramidal))
    count = min(len(p["levels"]) for p in pyramidal) if pyramidal and flat_images == 0 else 1
    mpp_known = image_count > 0 and len([p for p in entries if p.get("mpp")]) >= image_count
    levels = []
    if count > 1:
        for index in range(count):
            widths = [int(p["levels"][index][0]) for p in pyramidal]
            heights = [int(p["levels"][index][1]) for p in pyramidal]
            downsamples = [p["levels"][0][0] / max(1, p["levels"][index][0]) for p in pyramidal]
            mpps = [
                (float(p["mpp"][0]) * p["levels"][0][0] / max(1, p["levels"][index][0]))
                for p in pyramidal
                if p.get("mpp")
            ]
            levels.append(
                {
                    "level": index,
                    "width": _span(widths),
                    "height": _span(heights),
                    "downsample": _span(downsamples),
                    "mpp": _span(mpps) if mpp_known else None,
                    "max_pixels": max(int(w) * int(h) for p in pyramidal for w, h in [p["levels"][index]]),
                }
            )
    else:
        width, height = image_stats.get("width") or {}, image_stats.get("height") or {}
        mpps = [float(p["mpp"][0]) for p in entries if p.get("mpp")]
        megapixels = (image_stats.get("megapixels") or {}).get("max")
        levels.append(
            {
                "level": 0,
                "width": [width.get("min"), width.get("max")] if width else None,
                "height": [height.get("min"), height.get("max")] if height else None,
                "downsample": [1.0, 1.0],
                "mpp": _span(mpps) if mpp_known else None,
                "max_pixels": int(round(megapixels * 1e6)) if megapixels is not None else 0,
            }
        )
    physical = [float(p["mpp"][0]) * p["levels"][0][0] for p in entries if p.get("mpp")]
    return {
        "count": count,
        "pyramidal": count > 1,
        "mpp_known": mpp_known,
        "differing": len(set(counts)) > 1 or (bool(pyramidal) and flat_images > 0),
        "most": max(counts, default=1),
        "physical_um": _span(physical) if mpp_known else None,
        "levels": levels,
    }
