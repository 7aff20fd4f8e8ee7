"""Patch grid layout, backbone catalog, head, models and safe weight loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.grid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchGrid,
    PatchSource,
    TensorPatchSource,
    normalize_uint8,
)
from worker.patchgd.models import (
    BACKBONES,
    PatchGDHead,
    WeightsError,
    build_backbone,
    build_baseline_model,
    build_patchgd_model,
    load_weights,
)


def test_grid_is_row_major_everywhere() -> None:
    grid = PatchGrid(64, 16)
    assert (grid.n, grid.num_patches) == (4, 16)
    assert grid.coords(0) == (0, 0) and grid.coords(1) == (0, 1) and grid.coords(4) == (1, 0)
    images = torch.randn(2, 3, 64, 64)
    shared = grid.extract(images, torch.tensor([1, 4, 15]))
    assert shared.shape == (2, 3, 3, 16, 16)
    assert torch.equal(shared[1, 0], images[1, :, 0:16, 16:32])
    assert torch.equal(shared[0, 1], images[0, :, 16:32, 0:16])
    assert torch.equal(shared[1, 2], images[1, :, 48:64, 48:64])
    per_image = grid.extract(images, torch.tensor([[6], [9]]))
    assert torch.equal(per_image[0, 0], images[0, :, 16:32, 32:48])
    assert torch.equal(per_image[1, 0], images[1, :, 32:48, 16:32])
    # The traceable all-patches view (export) uses the same order as indexed extraction (training).
    assert torch.equal(
        grid.all_patches(images).reshape(2, 16, 3, 16, 16), grid.extract(images, torch.arange(16))
    )
    z = torch.zeros(2, 5, 4, 4)
    grid.scatter(z, torch.tensor([6]), torch.ones(2, 1, 5))
    assert z[:, :, 1, 2].eq(1).all() and z.sum() == 10
    with pytest.raises(IndexError):
        grid.coords(16)
    with pytest.raises(ValueError, match="expected images of shape"):
        grid.extract(torch.randn(1, 3, 60, 64), torch.tensor([0]))


def test_tensor_patch_source_satisfies_the_protocol() -> None:
    source = TensorPatchSource(torch.randn(2, 3, 32, 32), PatchGrid(32, 16))
    assert isinstance(source, PatchSource)
    assert source.batch_size == 2 and source.patches(torch.tensor([0, 3])).shape == (2, 2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, C, 32, 32\]"):
        TensorPatchSource(torch.randn(2, 3, 16, 16), PatchGrid(32, 16))


def test_normalize_uint8_uses_imagenet_statistics() -> None:
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    out = normalize_uint8(pixels)
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    assert torch.allclose(out[1], torch.tensor(-IMAGENET_MEAN[1] / IMAGENET_STD[1]))
    assert normalize_uint8(torch.zeros(2, 4, 4, 3, dtype=torch.uint8)).shape == (2, 3, 4, 4)
    assert normalize_uint8(np.zeros((4, 4), dtype=np.uint8)).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="expected uint8"):
        normalize_uint8(np.zeros((4, 4, 3), dtype=np.float32))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_catalog_backbone_projects_patches_to_the_latent_size(name: str) -> None:
    backbone = build_backbone(name, 12).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 12) and torch.isfinite(out).all()
    assert backbone.proj.in_features == BACKBONES[name].feature_dim


def test_single_channel_backbone() -> None:
    backbone = build_backbone("resnet18", 4, in_channels=1).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 1, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("kind", ["reference", "pooled"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 16])
def test_heads_handle_small_grids_even_for_one_image(n: int, kind: str) -> None:
    head = PatchGDHead(8, 3, n, kind=kind, width=8).train()
    logits = head(torch.randn(1, 8, n, n))
    assert logits.shape == (1, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def _randomised_head(kind: str, n: int) -> PatchGDHead:
    """A head in eval mode with random BatchNorm statistics and affine terms (not the identity)."""
    torch.manual_seed(0)
    head = PatchGDHead(6, 4, n, kind=kind, width=5).double().eval()
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -1, 1)
    return head


def _one_object(n: int, row: int, col: int, background: torch.Tensor, thing: torch.Tensor) -> torch.Tensor:
    z = background.view(1, -1, 1, 1).repeat(1, 1, n, n)
    z[0, :, row, col] = thing
    return z


def test_default_head_reads_an_object_the_same_wherever_it_lies() -> None:
    """The digit sum does not depend on where digits are, and the default head cannot make it.

    One latent "object" on a uniform background, at two grid cells at least four cells from the
    border (two 3x3 convolutions spread it two cells; the zero padding changes the outer two rings
    of the second convolution): the default (pooled) head gives the same logits for both. The
    reference head's flatten + Linear weighs every position separately, so there the logits
    differ: its classifier has to learn the same fact once per position, from the few canvases
    that had a digit there.
    """
    n = 12
    assert PatchGDConfig(num_classes=4).head == "pooled"
    torch.manual_seed(1)
    background, thing = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        pooled = _randomised_head("pooled", n)
        a, b = (pooled(_one_object(n, r, c, background, thing)) for r, c in ((4, 4), (7, 6)))
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
        reference = _randomised_head("reference", n)
        a, b = (reference(_one_object(n, r, c, background, thing)) for r, c in ((4, 4), (7, 6)))
        assert (a - b).abs().max() > 1e-6  # float64 noise is ~1e-15


def test_patchgd_model_shapes_and_full_forward() -> None:
    cfg = PatchGDConfig(
        num_classes=5, backbone="resnet18", image_size=64, patch_size=32, latent_dim=8, head="linear"
    )
    model = build_patchgd_model(cfg).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert model.encode(torch.randn(4, 3, 32, 32)).shape == (4, 8)
        z = model.latent_map(images)
        assert z.shape == (3, 8, 2, 2)
        # Cell (row 1, col 0) holds patch index 2, the bottom-left quarter of the image.
        assert torch.allclose(z[:, :, 1, 0], model.encode(images[:, :, 32:64, 0:32]), atol=1e-5)
        assert model(images).shape == (3, 5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_baseline_every_parameter_gets_a_gradient_and_checkpointing_matches(name: str) -> None:
    cfg = BaselineConfig(num_classes=3, backbone=name, image_size=64)
    torch.manual_seed(0)
    plain = build_baseline_model(cfg).train()
    checkpointed = build_baseline_model(
        BaselineConfig(**{**cfg.to_dict(), "gradient_checkpointing": True})
    ).train()
    checkpointed.load_state_dict(plain.state_dict())
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    for model in (plain, checkpointed):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    for (pname, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), pname


def _torchvision_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return getattr(tvm, name)(weights=None).state_dict()


def test_load_torchvision_state_dict_into_backbone(tmp_path: Path) -> None:
    state = _torchvision_state("mobilenet_v3_small")
    path = tmp_path / "mnv3.pt"
    torch.save(state, path)
    backbone = build_backbone("mobilenet_v3_small", 16, weights_path=path)
    loaded = backbone.trunk.state_dict()
    assert torch.equal(loaded["features.0.0.weight"], state["features.0.0.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("classifier."))


def test_load_own_export_in_safetensors_and_wrapped_dict(tmp_path: Path) -> None:
    source = build_backbone("resnet18", 8)
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "b.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "b.pth")
    for path in (tmp_path / "b.safetensors", tmp_path / "b.pth"):
        target = build_backbone("resnet18", 8)
        load_weights(target, path)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


def test_baseline_config_loads_pretrained_trunk(tmp_path: Path) -> None:
    state = _torchvision_state("resnet18")
    torch.save(state, tmp_path / "r18.pt")
    model = build_baseline_model(
        BaselineConfig(num_classes=2, backbone="resnet18", pretrained_weights=str(tmp_path / "r18.pt"))
    )
    assert torch.equal(model.trunk.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_weights_for_another_architecture_are_explained(tmp_path: Path) -> None:
    torch.save(_torchvision_state("resnet18"), tmp_path / "r18.pt")
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet34", 8, weights_path=tmp_path / "r18.pt")
    assert "missing keys: trunk.layer1.2" in str(info.value)
    with pytest.raises(WeightsError) as info:
        build_backbone("mobilenet_v2", 8, weights_path=tmp_path / "r18.pt")
    assert "unexpected keys: trunk.bn1.bias" in str(info.value)


def test_wrong_shapes_are_listed(tmp_path: Path) -> None:
    torch.save(_torchvision_state("resnet18"), tmp_path / "rgb.pt")
    with pytest.raises(WeightsError, match=r"shape mismatches: trunk\.conv1\.weight \(file \(64, 3, 7, 7\)"):
        build_backbone("resnet18", 8, weights_path=tmp_path / "rgb.pt", in_channels=1)


def test_broken_files_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        build_backbone("resnet18", 8, weights_path=tmp_path / "junk.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not contain a state dict"):
        build_backbone("resnet18", 8, weights_path=tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet18", 8, weights_path=tmp_path / "absent.pt")


class _WritesAFile:
    """Unpickling this object would create a file: the signature of a malicious checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.write_text, (self.target, "owned"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "weights.pt"
    payload = {"conv1.weight": _WritesAFile(marker)}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(WeightsError, match="refused: it is not a plain weights file"):
        build_backbone("resnet18", 8, weights_path=evil)
    assert not marker.exists()
    # The payload is real: an unsafe loader would have written the file.
    with open(evil, "rb") as handle:
        torch.load(handle, weights_only=False) if writer == "torch.save" else pickle.load(handle)
    assert marker.read_text() == "owned"
