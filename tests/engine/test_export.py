"""Exports reload and predict what the trained model predicts: safetensors, TorchScript, ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.export import (
    CONFIG_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_all,
    export_safetensors,
    load_exported,
    verify_export,
)
from worker.patchgd.grid import TensorPatchSource
from worker.patchgd.models import build_baseline_model, build_patchgd_model
from worker.patchgd.train import build_optimizer, patchgd_step


def _trained_patchgd(probe: torch.Tensor | None = None) -> tuple[torch.nn.Module, PatchGDConfig]:
    """A PatchGD model moved away from its initialisation (weights and BatchNorm statistics).

    With ``probe`` images, the classifier is then set so that their softmax outputs differ by
    design: two training steps leave a tiny model nearly constant, by an amount that depends on
    the CPU, and a comparison of near-constant outputs would not show a broken export.
    """
    cfg = PatchGDConfig(
        num_classes=3,
        backbone="resnet18",
        image_size=64,
        patch_size=16,
        latent_dim=16,
        head_width=16,
        lr_backbone=1e-2,
        lr_head=1e-2,
    )
    torch.manual_seed(0)
    model = build_patchgd_model(cfg).train()
    optimizer = build_optimizer(model, cfg)
    for _ in range(2):
        images = torch.randn(4, 3, 64, 64)
        patchgd_step(model, optimizer, TensorPatchSource(images, model.grid), torch.tensor([0, 1, 2, 0]), cfg)
    model.eval()
    if probe is not None:
        _spread_outputs(model.head.classifier, lambda: model(probe))
    return model, cfg


def _spread_outputs(classifier: torch.nn.Linear, forward) -> None:
    """Rewrite ``classifier`` so the probe images' logits differ by several units along one direction.

    The penultimate features of the probe images are projected on the direction in which the
    first image differs from their mean; class 0 gets +projection, class 1 -projection (scaled so
    the probes span 4 logit units), the others 0. Fails clearly if the probes' features barely differ.
    """
    captured: list[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    with torch.no_grad():
        forward()
    hook.remove()
    features = captured[0].double()
    mean = features.mean(dim=0)
    direction = features[0] - mean
    assert direction.norm() > 0, "the model maps every probe image to the same features"
    direction = direction / direction.norm()
    projections = (features - mean) @ direction
    spread = (projections.max() - projections.min()).item()
    # Different images give features that differ by a sizeable fraction of their norm (15 against
    # about 100 here); a much smaller spread would make the rescaled logits amplify rounding noise.
    assert spread > 1e-3 * features.norm(dim=1).max().item(), "the probe images' features barely differ"
    scale = 4.0 / spread
    weight = torch.zeros_like(classifier.weight, dtype=torch.float64)
    weight[0], weight[1] = direction * scale, -direction * scale
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(-(weight @ mean))


def test_patchgd_export_round_trips_in_every_format(tmp_path: Path) -> None:
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model, cfg = _trained_patchgd(images)
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1)
    # Not a constant output (by construction: the probes' class-0 logits span 4 units).
    assert (expected.max(dim=0).values - expected.min(dim=0).values).max() > 0.1, expected

    report = export_all(model, cfg, tmp_path)
    assert set(report["paths"]) == {"safetensors", "torchscript", "onnx"}
    assert all(diff <= 1e-4 for diff in report["max_abs_difference"].values())

    reloaded, reloaded_cfg = load_exported(tmp_path)
    assert reloaded_cfg == cfg and not reloaded.training
    with torch.no_grad():
        assert torch.allclose(torch.softmax(reloaded(images), dim=1), expected, atol=1e-6)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["algorithm"] == "patchgd" and meta["config"]["patch_size"] == 16

    # ONNX: one self-contained file (what a download serves: no external-data file beside it),
    # any batch size at the training resolution.
    assert sorted(p.name for p in tmp_path.glob("*onnx*")) == [ONNX_FILE]
    session = onnxruntime.InferenceSession(
        (tmp_path / ONNX_FILE).read_bytes(), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    assert logits.shape == (3, 3)
    assert np.allclose(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), expected.numpy(), atol=1e-4)


def test_verify_export_catches_tampered_weights(tmp_path: Path) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model, cfg = _trained_patchgd(images)
    export_safetensors(model, cfg, tmp_path)
    assert verify_export(model, cfg, tmp_path, formats=("safetensors",), images=images)["safetensors"] <= 1e-6
    with torch.no_grad():
        probabilities = torch.softmax(model(images), dim=1)
    # Raise the logit of the least likely class (p <= 1/3, and >= e^-8 / 3 as the probes' logits
    # span 4 units) by 20 for every image: its probability then becomes nearly 1 there. One class
    # only, since a shift of every logit would cancel in softmax.
    least_likely = int(probabilities.min(dim=0).values.argmin())
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    state["head.classifier.bias"][least_likely] += 20.0
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ExportError, match="safetensors export differs from the trained model"):
        verify_export(model, cfg, tmp_path, formats=("safetensors",), images=images)


def test_baseline_export_and_clear_errors(tmp_path: Path) -> None:
    cfg = BaselineConfig(num_classes=2, backbone="resnet18", image_size=32, pretrained_weights="/gone/r18.pt")
    model = build_baseline_model(cfg, load_pretrained=False)
    report = export_all(model, cfg, tmp_path, formats=("safetensors", "torchscript"))
    assert report["max_abs_difference"]["torchscript"] <= 1e-5
    # The exported config does not depend on the original pretrained file any more.
    reloaded, reloaded_cfg = load_exported(tmp_path)
    assert reloaded_cfg.pretrained_weights is None
    with pytest.raises(ExportError, match="unknown export format"):
        export_all(model, cfg, tmp_path, formats=("pickle",))
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(ExportError, match="config.json .* is missing or invalid"):
        load_exported(tmp_path)
