"""One error hierarchy: every input the engine refuses raises a subclass of ``EngineError``.

A task catches ``EngineError`` to show the message to the user; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.patchgd import errors
from worker.patchgd.checkpoint import load_checkpoint
from worker.patchgd.config import PatchGDConfig, config_from_dict
from worker.patchgd.data import open_image, scan_dataset
from worker.patchgd.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    EngineError,
    ExportError,
    ImageError,
    WeightsError,
)
from worker.patchgd.export import export_all, load_exported
from worker.patchgd.infer import predict
from worker.patchgd.memory import Calibration, plan_patchgd
from worker.patchgd.models import build_backbone, build_patchgd_model, load_weights

SUBCLASSES = (ConfigError, DatasetError, ImageError, WeightsError, CheckpointError, ExportError)


def test_every_engine_error_is_an_engine_error() -> None:
    assert set(errors.__all__) == {cls.__name__ for cls in SUBCLASSES} | {"EngineError"}
    for cls in SUBCLASSES:
        assert issubclass(cls, EngineError)
        assert cls is not EngineError
    # Callers that caught the old built-in bases keep working.
    for cls in (ConfigError, DatasetError, ImageError, WeightsError, CheckpointError):
        assert issubclass(cls, ValueError)
    assert issubclass(ExportError, RuntimeError)
    assert not issubclass(EngineError, ValueError | RuntimeError)


def test_the_modules_raise_the_shared_classes() -> None:
    """Each module's error is the shared class itself, not a look-alike of the same name."""
    from worker.patchgd import checkpoint, config, data, export, models

    assert config.ConfigError is ConfigError
    assert data.DatasetError is DatasetError and data.ImageError is ImageError
    assert models.WeightsError is WeightsError
    assert checkpoint.CheckpointError is CheckpointError
    assert export.ExportError is ExportError


def _tiny_cfg() -> PatchGDConfig:
    return PatchGDConfig(num_classes=2, backbone="resnet18", image_size=32, patch_size=16, latent_dim=8)


def test_typical_bad_inputs_raise_the_right_subclass(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not an image, a checkpoint or a weights file")

    with pytest.raises(ConfigError, match="num_classes must be at least 2"):
        config_from_dict("patchgd", {"num_classes": 1})
    with pytest.raises(ConfigError, match="unknown algorithm"):
        config_from_dict("svm", {"num_classes": 2})
    with pytest.raises(ConfigError, match="positive number of GiB"):
        plan_patchgd(_tiny_cfg(), -1, calibration=Calibration(500.0, 0))

    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "missing")
    (tmp_path / "one_class" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError):
        scan_dataset(tmp_path / "one_class")

    with pytest.raises(ImageError, match="not a readable image"):
        open_image(junk)
    model = build_patchgd_model(_tiny_cfg()).eval()
    with pytest.raises(ImageError, match=r"expected images of shape \[B, C, 32, 32\]"):
        predict(model, torch.zeros(1, 3, 64, 64))

    with pytest.raises(WeightsError, match="not found"):
        load_weights(build_backbone("resnet18", 8), tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="could not be read"):
        load_weights(build_backbone("resnet18", 8), junk)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(junk)

    with pytest.raises(ExportError, match="missing or invalid"):
        load_exported(tmp_path)
    with pytest.raises(ExportError, match="unknown export format"):
        export_all(model, _tiny_cfg(), tmp_path / "out", formats=("pickle",))
