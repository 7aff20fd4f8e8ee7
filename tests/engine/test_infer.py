"""Prediction: chunked latent fill for PatchGD (streaming-friendly) and whole images for the baseline."""

from __future__ import annotations

import pytest
import torch

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import PatchGrid, TensorPatchSource
from worker.patchgd.infer import predict
from worker.patchgd.models import build_baseline_model, build_patchgd_model

CFG = PatchGDConfig(
    num_classes=4,
    backbone="resnet18",
    image_size=64,
    patch_size=16,
    latent_dim=8,
    head_width=8,
    precision="fp32",
)


class CountingSource(TensorPatchSource):
    """A patch source that records how many positions each request asked for."""

    def __init__(self, images: torch.Tensor, grid: PatchGrid) -> None:
        super().__init__(images, grid)
        self.requests: list[int] = []

    def patches(self, indices: torch.Tensor) -> torch.Tensor:
        self.requests.append(indices.shape[-1])
        return super().patches(indices)


def test_patchgd_prediction_matches_the_full_forward_for_any_chunking() -> None:
    torch.manual_seed(0)
    model = build_patchgd_model(CFG)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(images), dim=1)
    model.train()  # predict must switch to eval mode itself
    for chunk_size in (None, 1, 5, 16):
        probs = predict(model, images, device="cpu", chunk_size=chunk_size)
        assert probs.shape == (3, 4)
        assert torch.allclose(probs, expected, atol=1e-6)
        assert torch.allclose(probs.sum(dim=1), torch.ones(3))
    assert not model.training


def test_patchgd_prediction_only_requests_one_chunk_at_a_time() -> None:
    model = build_patchgd_model(CFG)
    source = CountingSource(torch.randn(2, 3, 64, 64), model.grid)
    predict(model, source, chunk_size=3)
    assert sum(source.requests) == 16 and max(source.requests) == 3


def test_prediction_rejects_a_mismatched_grid_and_baseline_takes_tensors() -> None:
    model = build_patchgd_model(CFG)
    with pytest.raises(ValueError, match="trained on a 64px image with 16px patches, the input is 32px"):
        predict(model, TensorPatchSource(torch.randn(1, 3, 32, 32), PatchGrid(32, 16)))
    baseline = build_baseline_model(BaselineConfig(num_classes=2, backbone="resnet18", image_size=64))
    images = torch.randn(5, 3, 64, 64)
    whole = predict(baseline, images)
    assert whole.shape == (5, 2) and torch.allclose(predict(baseline, images, chunk_size=2), whole, atol=1e-6)
    with pytest.raises(TypeError, match="needs the images as a tensor"):
        predict(baseline, TensorPatchSource(images, PatchGrid(64, 16)))
