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


def _trained_patchgd() -> tuple[torch.nn.Module, PatchGDConfig]:
    """A PatchGD model moved away from its initialisation (weights and BatchNorm statistics)."""
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
    return model.eval(), cfg


def test_patchgd_export_round_trips_in_every_format(tmp_path: Path) -> None:
    model, cfg = _trained_patchgd()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1)
    assert (expected.max(dim=0).values - expected.min(dim=0).values).max() > 1e-3  # not a constant output

    report = export_all(model, cfg, tmp_path)
    assert set(report["paths"]) == {"safetensors", "torchscript", "onnx"}
    assert all(diff <= 1e-4 for diff in report["max_abs_difference"].values())

    reloaded, reloaded_cfg = load_exported(tmp_path)
    assert reloaded_cfg == cfg and not reloaded.training
    with torch.no_grad():
        assert torch.allclose(torch.softmax(reloaded(images), dim=1), expected, atol=1e-6)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["algorithm"] == "patchgd" and meta["config"]["patch_size"] == 16

    # ONNX: any batch size at the training resolution.
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    assert logits.shape == (3, 3)
    assert np.allclose(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), expected.numpy(), atol=1e-4)


def test_verify_export_catches_tampered_weights(tmp_path: Path) -> None:
    model, cfg = _trained_patchgd()
    export_safetensors(model, cfg, tmp_path)
    assert verify_export(model, cfg, tmp_path, formats=("safetensors",))["safetensors"] <= 1e-6
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    state["head.classifier.weight"][0] += 1.0  # one class only: a shift of every logit cancels in softmax
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ExportError, match="safetensors export differs from the trained model"):
        verify_export(model, cfg, tmp_path, formats=("safetensors",))


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
