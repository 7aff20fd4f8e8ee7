"""Per-cell evidence of a PatchGD prediction (occlusion of each cell's latent in Z, head only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.patchgd import patch_evidence
from worker.patchgd.config import PatchGDConfig
from worker.patchgd.grid import PatchGrid, TensorPatchSource
from worker.patchgd.infer import predict
from worker.patchgd.models import PatchGDHead, PatchGDModel, build_patchgd_model


class Brightness(nn.Module):
    """A backbone whose latent is ``[mean pixel value of the patch, 0]``: known by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0], [0.0]]))
            self.proj.bias.zero_()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.mean(dim=(1, 2, 3)).unsqueeze(1))


def one_cell_decides() -> PatchGDModel:
    """Class 1 when the image's mean brightness is over 1/32, class 0 otherwise (linear head)."""
    grid = PatchGrid(64, 16)
    head = PatchGDHead(2, 2, grid.n, kind="linear", dropout=0.0)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[0.0, 0.0], [32.0, 0.0]]))
        head.classifier.bias.copy_(torch.tensor([1.0, 0.0]))
    return PatchGDModel(Brightness(), head, grid).eval()


def image_with_bright_cell(row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = 1.0
    return image


@pytest.mark.parametrize("baseline", ["mean", "zero"])
@pytest.mark.parametrize(("row", "col"), [(1, 2), (3, 0)])
def test_the_cell_that_decides_the_class_has_the_top_evidence(baseline: str, row: int, col: int) -> None:
    model = one_cell_decides()
    image = image_with_bright_cell(row, col)
    # Mean brightness 1/16: logit of class 1 is 2 against 1, so class 1 is predicted.
    result = patch_evidence(model, image, baseline=baseline, batch_size=5)
    assert result.target == 1 and result.baseline == baseline
    assert torch.allclose(result.probabilities, predict(model, image)[0])
    assert result.evidence.shape == (4, 4)
    top = divmod(int(result.evidence.flatten().argmax()), 4)
    assert top == (row, col)
    assert result.evidence[row, col] > 0.2  # without it the mean is 0 (or 1/256): class 0 wins
    others = result.evidence.clone()
    others[row, col] = 0
    if baseline == "zero":  # a dark cell replaced by a zero latent changes nothing
        assert others.abs().max() < 1e-6
    else:  # a dark cell replaced by the image's mean makes the image brighter: against class 0
        assert (others.flatten().sum() - others[row, col]) < 0 and others.max() <= 0


def test_evidence_is_the_drop_of_the_target_probability_when_a_cell_is_occluded() -> None:
    torch.manual_seed(0)
    cfg = PatchGDConfig(
        num_classes=3, backbone="resnet18", image_size=64, patch_size=16, latent_dim=8, head_width=8
    )
    model = build_patchgd_model(cfg).eval()
    image = torch.randn(1, 3, 64, 64)
    result = patch_evidence(model, TensorPatchSource(image, model.grid), target=2, batch_size=3)
    assert result.target == 2
    with torch.no_grad():
        z = model.latent_map(image)
        reference = torch.softmax(model.classify(z), dim=1)[0, 2]
        occluded = z.clone()
        occluded[0, :, 2, 1] = z.mean(dim=(2, 3))[0]
        dropped = torch.softmax(model.classify(occluded), dim=1)[0, 2]
    assert result.evidence[2, 1] == pytest.approx(float(reference - dropped), abs=1e-5)


def test_bad_requests_are_refused() -> None:
    model = one_cell_decides()
    with pytest.raises(ValueError, match="one image at a time"):
        patch_evidence(model, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="baseline must be one of mean, zero"):
        patch_evidence(model, torch.zeros(1, 3, 64, 64), baseline="blur")
    with pytest.raises(ValueError, match="not a class of this model"):
        patch_evidence(model, torch.zeros(1, 3, 64, 64), target=5)
    with pytest.raises(TypeError, match="needs a PatchGD model"):
        patch_evidence(nn.Linear(2, 2), torch.zeros(1, 3, 64, 64))  # type: ignore[arg-type]
