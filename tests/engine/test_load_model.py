"""``load_model``: one call rebuilds a trained model from a checkpoint or an export folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.errors import CheckpointError, ExportError
from worker.patchgd.export import export_safetensors, load_model
from worker.patchgd.train import train


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=2)


CONFIGS = {
    "patchgd": PatchGDConfig(
        num_classes=2,
        backbone="resnet18",
        image_size=32,
        patch_size=16,
        latent_dim=8,
        head_width=8,
        epochs=1,
        batch_size=2,
        warmup_epochs=0,
    ),
    "baseline": BaselineConfig(
        num_classes=2, backbone="resnet18", image_size=32, epochs=1, batch_size=2, warmup_epochs=0
    ),
}


@pytest.mark.parametrize("algorithm", sorted(CONFIGS))
def test_load_model_rebuilds_the_trained_model(algorithm: str, tmp_path: Path) -> None:
    cfg = CONFIGS[algorithm]
    result = train(cfg, _loader(), device="cpu", checkpoint_dir=tmp_path / "run")  # two steps
    assert result.steps == 2 and result.checkpoint_path is not None
    trained = result.model.eval()
    export_safetensors(trained, cfg, tmp_path / "export")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(images)

    for path in (result.checkpoint_path, tmp_path / "run", tmp_path / "export"):
        model, loaded_cfg = load_model(path)
        assert loaded_cfg == cfg and type(model) is type(trained) and not model.training, path
        for name, tensor in trained.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (path, name)
        with torch.no_grad():
            assert torch.equal(model(images), expected), path


def test_load_model_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="neither an export folder"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format_version": 1, "algorithm": "patchgd", "config": {"num_classes": 1}}, foreign)
    with pytest.raises(CheckpointError, match="no usable config: num_classes must be at least 2"):
        load_model(foreign)
