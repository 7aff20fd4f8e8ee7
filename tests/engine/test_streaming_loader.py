"""Datasets of large or pyramidal files: per-sample streaming sources, batched, trained on."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.config import PatchGDConfig
from worker.patchgd.data import (
    DatasetIndex,
    FilePatchSource,
    Sample,
    StackedPatchSource,
    StreamingImageDataset,
    collate_patch_sources,
    make_loaders,
    needs_streaming,
    open_region_reader,
)
from worker.patchgd.grid import PatchGrid, normalize_uint8
from worker.patchgd.testing import write_pyramidal_tiff
from worker.patchgd.train import train

SIZE = 64  # the model's image size; each file is 4x larger at level 0, exactly SIZE at level 2


def _noise(seed: int):  # noqa: ANN202 - tile function for write_pyramidal_tiff
    def tile(downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.random.default_rng([seed, downsample, x, y]).integers(0, 256, (h, w, 3), dtype=np.uint8)

    return tile


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("pyramids")
    samples = []
    for i in range(6):
        path = write_pyramidal_tiff(root / f"slide{i}.tif", 4 * SIZE, tile=32, levels=3, tile_fn=_noise(i))
        samples.append(Sample(path, i % 2, "train" if i < 4 else "val"))
    return samples


def _in_memory(samples: list[Sample]) -> TensorDataset:
    """The same images held in memory: level 2 of each file, read whole."""
    images = []
    for sample in samples:
        with open_region_reader(sample.path, level=2) as reader:
            assert reader.size == (SIZE, SIZE)
            images.append(normalize_uint8(reader.read_region(0, 0, SIZE, SIZE)))
    return TensorDataset(torch.stack(images), torch.tensor([s.label for s in samples]))


CFG = PatchGDConfig(
    num_classes=2,
    backbone="resnet18",
    image_size=SIZE,
    patch_size=16,
    sampling=0.25,
    accumulation_steps=2,  # two optimizer steps per outer step
    latent_dim=8,
    head_width=8,
    epochs=2,
    batch_size=2,
    warmup_epochs=1,
    per_image_positions=True,  # [B, k] indices: each streamed image gets its own positions
    seed=4,
)


def _train(train_loader, val_loader):  # noqa: ANN001, ANN202 - test helper
    losses: list[float] = []
    record = lambda p: p.phase == "train" and losses.append(p.loss)  # noqa: E731
    return train(CFG, train_loader, val_loader, device="cpu", on_progress=record), losses


def test_training_on_streamed_files_equals_training_in_memory(slides: list[Sample]) -> None:
    train_samples, val_samples = slides[:4], slides[4:]
    grid = CFG.grid
    streamed, streamed_losses = _train(
        DataLoader(
            StreamingImageDataset(train_samples, grid),
            batch_size=2,
            shuffle=True,
            generator=torch.Generator(),
            collate_fn=collate_patch_sources,
        ),
        DataLoader(StreamingImageDataset(val_samples, grid), batch_size=2, collate_fn=collate_patch_sources),
    )
    held, held_losses = _train(
        DataLoader(_in_memory(train_samples), batch_size=2, shuffle=True, generator=torch.Generator()),
        DataLoader(_in_memory(val_samples), batch_size=2),
    )
    assert streamed.status == held.status == "succeeded" and len(streamed_losses) == 4
    assert streamed_losses == held_losses
    assert streamed.final == held.final
    for name, value in held.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[name]), name


def test_stacked_sources_hand_out_each_images_patches(slides: list[Sample]) -> None:
    grid = PatchGrid(SIZE, 16)
    images = _in_memory(slides[:3]).tensors[0]
    stacked = StackedPatchSource([FilePatchSource(s.path, grid) for s in slides[:3]])
    assert stacked.batch_size == 3 and stacked.grid == grid
    shared = torch.tensor([0, 5, 15])
    assert torch.equal(stacked.patches(shared), grid.extract(images, shared))
    per_image = torch.tensor([[1, 2], [3, 4], [15, 0]])
    assert torch.equal(stacked.patches(per_image), grid.extract(images, per_image))
    with pytest.raises(ValueError, match=r"\[3, k\]"):
        stacked.patches(torch.zeros(2, 2, dtype=torch.long))
    # An opened source pickles without its file handle (DataLoader workers) and reopens.
    copy = pickle.loads(pickle.dumps(stacked.sources[0]))
    assert torch.equal(copy.patches(shared), stacked.patches(shared)[:1])
    stacked.close()
    with pytest.raises(ValueError, match="same patch grid"):
        StackedPatchSource(
            [FilePatchSource(slides[0].path, grid), FilePatchSource(slides[1].path, PatchGrid(32, 16))]
        )


def test_make_loaders_streams_large_or_pyramidal_files(slides: list[Sample], tmp_path: Path) -> None:
    png = tmp_path / "small.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(png)
    assert needs_streaming(slides[0].path) and not needs_streaming(png)
    assert needs_streaming(png, min_pixels=80 * 80 - 1)
    index = DatasetIndex(
        root=tmp_path, classes=("a", "b"), samples=(*slides, Sample(png, 0, "test")), source="folders"
    )
    common = {"image_size": SIZE, "batch_size": 2, "cache_dir": tmp_path / "cache", "patch_size": 16}
    auto = make_loaders(index, streaming="auto", **common)
    # The pyramidal splits stream, the split of one small PNG is resized in memory as before.
    assert isinstance(auto["train"].dataset, StreamingImageDataset)
    assert isinstance(auto["val"].dataset, StreamingImageDataset)
    assert not isinstance(auto["test"].dataset, StreamingImageDataset)
    sources, labels = next(iter(auto["train"]))
    assert isinstance(sources, StackedPatchSource) and sources.batch_size == 2 and labels.shape == (2,)
    everything = make_loaders(index, streaming=True, **common)
    assert all(isinstance(loader.dataset, StreamingImageDataset) for loader in everything.values())
    with pytest.raises(ValueError, match="patch_size"):
        make_loaders(index, image_size=SIZE, batch_size=2, cache_dir=tmp_path / "cache", streaming=True)
