"""Streaming input: pyramidal TIFF written tile by tile, region reads, StreamingPatchSource."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from worker.patchgd.data import (
    ImageError,
    StreamingPatchSource,
    best_level_for,
    open_region_reader,
)
from worker.patchgd.grid import PatchGrid, normalize_uint8
from worker.patchgd.memory import RssSampler
from worker.patchgd.testing import synthetic_region, write_pyramidal_tiff

FULL_16K_RGB = 16384 * 16384 * 3  # 768 MiB: what materialising the whole slide would cost


@pytest.fixture(scope="module")
def slide_16k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16k x 16k RGB pyramid (7 levels) written from a tile generator (~19 MB on disk)."""
    path = tmp_path_factory.mktemp("slides") / "slide16k.tif"
    with RssSampler() as sampler:
        write_pyramidal_tiff(path, 16384, tile=256)
    # Writing streams tiles: memory stays far below the image itself.
    assert sampler.growth < FULL_16K_RGB / 4
    return path


def test_pyramid_levels_and_level_choice(slide_16k: Path) -> None:
    with open_region_reader(slide_16k) as reader:
        assert reader.level_dimensions == tuple((16384 >> i, 16384 >> i) for i in range(7))
        assert reader.level == 0 and reader.size == (16384, 16384)
        assert reader.best_level_for(2048) == 3
        assert reader.best_level_for(2000) == 3  # smallest level still >= the target
        assert reader.best_level_for(2049) == 2
        assert reader.best_level_for(100_000) == 0
    with open_region_reader(slide_16k, target_size=1024) as reader:
        assert reader.level == 4 and reader.size == (1024, 1024)
    assert best_level_for([(1000, 800), (500, 400)], 450) == 0  # 400 < 450 on the short side


def test_streamed_patches_at_level0_are_bounded_and_exact(slide_16k: Path) -> None:
    grid = PatchGrid(2048, 256)  # n = 8: each patch covers a 2048 x 2048 region of level 0
    with open_region_reader(slide_16k, level=0) as reader:
        source = StreamingPatchSource(reader, grid)
        assert source.batch_size == 1 and source.grid == grid
        patches = []
        with RssSampler() as sampler:
            for chunk in torch.arange(grid.num_patches).split(8):
                patches.append(source.patches(chunk))
        streamed = torch.cat(patches, dim=1)
    assert streamed.shape == (1, 64, 3, 256, 256) and streamed.dtype == torch.float32
    # Host memory is bounded by the patches in flight, far below the whole slide.
    print(f"RSS growth while streaming 64 patches: {sampler.growth / 2**20:.0f} MiB")
    assert sampler.growth < FULL_16K_RGB / 3, f"RSS grew by {sampler.growth / 2**20:.0f} MiB"
    # The smaller reference: level 3 of the same slide (downsample 8) cut into 256 x 256 tiles.
    for index in (0, 9, 27, 63):
        row, col = grid.coords(index)
        expected = normalize_uint8(synthetic_region(8, col * 256, row * 256, 256, 256))
        assert torch.equal(streamed[0, index], expected), index


def test_streaming_at_the_chosen_level_matches_level0(slide_16k: Path) -> None:
    grid = PatchGrid(2048, 256)
    with open_region_reader(slide_16k, target_size=2048) as coarse:
        assert coarse.level == 3
        fast = StreamingPatchSource(coarse, grid).patches(torch.tensor([[5, 40, 63]]))
    with open_region_reader(slide_16k, level=0) as fine:
        slow = StreamingPatchSource(fine, grid).patches([5, 40, 63])
    assert torch.equal(fast, slow)


def test_openslide_reads_the_same_pyramid(slide_16k: Path) -> None:
    with (
        open_region_reader(slide_16k, backend="openslide", level=3) as slide,
        open_region_reader(slide_16k, backend="tifffile", level=3) as tiff,
    ):
        assert slide.level_dimensions == tiff.level_dimensions
        region = slide.read_region(300, 700, 333, 129)
        assert region.shape == (129, 333, 3) and region.dtype == np.uint8
        assert np.array_equal(region, tiff.read_region(300, 700, 333, 129))
        assert np.array_equal(region, synthetic_region(8, 300, 700, 333, 129))


def test_unaligned_regions_across_tiles_and_edges(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "odd.tif", (1000, 700), tile=128, levels=2)
    with open_region_reader(path) as reader:
        assert reader.level_dimensions == ((1000, 700), (500, 350))
        for x, y, w, h in [(0, 0, 1000, 700), (127, 129, 3, 300), (990, 690, 10, 10), (5, 600, 995, 100)]:
            assert np.array_equal(reader.read_region(x, y, w, h), synthetic_region(1, x, y, w, h))
        reader.set_level(1)
        assert np.array_equal(reader.read_region(250, 100, 250, 250), synthetic_region(2, 250, 100, 250, 250))
        with pytest.raises(ValueError, match="outside"):
            reader.read_region(400, 0, 200, 10)
        with pytest.raises(ValueError, match="level 5 does not exist"):
            reader.set_level(5)
        # A 7 x 7 grid does not divide 500 x 350: regions are rounded and resized to P x P.
        source = StreamingPatchSource(reader, PatchGrid(7 * 16, 16))
        assert source.region(0) == (0, 0, 71, 50)
        assert source.region(48) == (429, 300, 71, 50)
        assert source.patches(torch.arange(49)).shape == (1, 49, 3, 16, 16)
        with pytest.raises(ValueError, match="one image"):
            source.patches(torch.zeros(2, 3, dtype=torch.long))


def test_grey_tiff_streams_as_rgb_and_palette_is_refused(tmp_path: Path) -> None:
    grey = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey, tile=(16, 16), photometric="minisblack")
    with open_region_reader(tmp_path / "grey.tif") as reader:
        region = reader.read_region(10, 5, 30, 20)
    assert region.shape == (20, 30, 3) and np.array_equal(region[:, :, 1], grey[5:25, 10:40])
    colormap = np.zeros((3, 256), np.uint16)
    tifffile.imwrite(tmp_path / "palette.tif", grey, tile=(16, 16), photometric="palette", colormap=colormap)
    with pytest.raises(ImageError, match="photometric PALETTE cannot be streamed"):
        open_region_reader(tmp_path / "palette.tif")


def test_ordinary_images_and_bad_files(tmp_path: Path) -> None:
    png = tmp_path / "small.png"
    Image.fromarray(synthetic_region(1, 0, 0, 128, 96)).save(png)
    with open_region_reader(png) as reader:
        assert reader.level_dimensions == ((128, 96),)
        assert np.array_equal(reader.read_region(60, 10, 20, 30), synthetic_region(1, 60, 10, 20, 30))
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(ImageError, match="not a readable TIFF"):
        open_region_reader(junk)
    with pytest.raises(ImageError, match="OpenSlide cannot read"):
        open_region_reader(png, backend="openslide")
    with pytest.raises(ImageError, match="exceeds the limit"):
        open_region_reader(png, max_pixels=1000)
