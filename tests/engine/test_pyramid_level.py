"""Training images read from a chosen pyramid level: the resize-once cache reads that level's pixels.

The test TIFFs paint every level a constant colour of its own (level L: value 10 * (L + 1)), so the
pixels read say which level was read, by construction and without any floating-point luck.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.patchgd.config import IN_MEMORY_MAX_PIXELS, PatchGDConfig, config_from_dict
from worker.patchgd.data import (
    DEFAULT_MAX_PIXELS,
    DatasetIndex,
    ImageFolderDataset,
    Sample,
    load_level_resized,
    make_loaders,
)
from worker.patchgd.errors import ConfigError, ImageError
from worker.patchgd.testing import level_colour, synthetic_region, write_pyramidal_tiff


def coloured_tiff(path: Path, size: int = 256) -> Path:
    # 256² in 64² tiles: levels 256², 128², 64².
    return write_pyramidal_tiff(path, size, tile=64, tile_fn=level_colour)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_level_is_read_and_resized(tmp_path: Path, level: int) -> None:
    path = coloured_tiff(tmp_path / "slide.tif")
    array = load_level_resized(path, level, 32)
    assert array.shape == (32, 32, 3)
    assert np.all(array == 10 * (level + 1))


def test_level_at_the_training_size_is_not_resampled(tmp_path: Path) -> None:
    # Level 1 of a 256² pyramid is 128²: at image_size 128 the pixels are that level's, one for one.
    path = write_pyramidal_tiff(tmp_path / "blocks.tif", 256, tile=64)
    assert np.array_equal(load_level_resized(path, 1, 128), synthetic_region(2, 0, 0, 128, 128))


def test_missing_level_and_level_of_a_flat_image_are_refused(tmp_path: Path) -> None:
    path = coloured_tiff(tmp_path / "slide.tif")
    with pytest.raises(ImageError, match=r"level 3 does not exist \(it has 3 levels, 0 to 2\)"):
        load_level_resized(path, 3, 32)
    png = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png)
    with pytest.raises(ImageError, match="level 1 does not exist .*level 0 only"):
        load_level_resized(png, 1, 32)
    assert np.all(load_level_resized(png, 0, 32) == (1, 2, 3))


def test_level_over_the_in_memory_limit_is_refused(tmp_path: Path) -> None:
    path = coloured_tiff(tmp_path / "slide.tif")
    with pytest.raises(ImageError, match="level 1 is 128x128 = 16,384 pixels, over the limit of 10,000"):
        load_level_resized(path, 1, 32, max_pixels=10_000)
    assert np.all(load_level_resized(path, 2, 32, max_pixels=10_000) == 30)


def test_cache_reads_the_chosen_level_and_keys_on_it(tmp_path: Path) -> None:
    path = coloured_tiff(tmp_path / "slide.tif")
    samples = [Sample(path, 0, "train")]
    at_level = ImageFolderDataset(samples, 32, tmp_path / "cache", level=2)
    full = ImageFolderDataset(samples, 32, tmp_path / "cache")
    assert np.all(at_level.resized_uint8(0) == 30)
    assert np.all(full.resized_uint8(0) == 10)
    assert at_level.cache_path(samples[0]) != full.cache_path(samples[0])
    assert (at_level.decodes, full.decodes) == (1, 1)


def test_make_loaders_passes_the_level_to_the_cache(tmp_path: Path) -> None:
    a, b = coloured_tiff(tmp_path / "a.tif"), coloured_tiff(tmp_path / "b.tif")
    index = DatasetIndex(tmp_path, ("x", "y"), (Sample(a, 0, "train"), Sample(b, 1, "train")), "folders")
    loaders = make_loaders(index, image_size=32, batch_size=2, cache_dir=tmp_path / "cache", level=1)
    dataset = loaders["train"].dataset
    assert isinstance(dataset, ImageFolderDataset)
    assert np.all(dataset.resized_uint8(0) == 20) and np.all(dataset.resized_uint8(1) == 20)


def test_config_checks_the_level() -> None:
    assert PatchGDConfig(num_classes=2, pyramid_level=2).pyramid_level == 2
    assert (
        config_from_dict("baseline", {"num_classes": 2, "pyramid_level": 0}).to_dict()["pyramid_level"] == 0
    )
    with pytest.raises(ConfigError, match="pyramid_level must be at least 0"):
        PatchGDConfig(num_classes=2, pyramid_level=-1)
    with pytest.raises(ConfigError, match="pyramid_level must be a whole number"):
        PatchGDConfig(num_classes=2, pyramid_level=1.5)


def test_the_torch_free_limit_is_the_loaders() -> None:
    assert IN_MEMORY_MAX_PIXELS == DEFAULT_MAX_PIXELS
