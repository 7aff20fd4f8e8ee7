"""Predictions read a pyramidal upload at the task's training level when the upload has it.

The test slide paints each level its own grey (``level_colour``: level L is 10 * (L + 1)), so the
pixels a prediction's reader returns say which level it read.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from worker.patchgd.config import BaselineConfig, PatchGDConfig
from worker.patchgd.testing import level_colour, write_pyramidal_tiff
from worker.tasks.predictions import _model_input_streamed, _training_level, _whole_image_streamed

LIMITS = SimpleNamespace(max_slide_pixels=10**9)
LEVELS = 3  # 512, 256, 128 px


def _slide(tmp_path: Path) -> Path:
    return write_pyramidal_tiff(tmp_path / "slide.tif", 512, tile=64, levels=LEVELS, tile_fn=level_colour)


def _patchgd(level: int | None) -> PatchGDConfig:
    return PatchGDConfig(
        num_classes=2, backbone="resnet18", image_size=64, patch_size=16, pyramid_level=level
    )


def test_patchgd_prediction_reads_the_training_level(tmp_path: Path) -> None:
    slide = _slide(tmp_path)
    source, described = _model_input_streamed(slide, _patchgd(1), LIMITS, LEVELS)
    try:
        assert described["level"] == 1 and described["level_size"] == [256, 256]
        assert np.all(source.open().patch_uint8(0) == 20)  # level 1's grey
    finally:
        source.close()
    # Trained on level 0: the smallest level at least image_size (64 px): level 2, 128 px.
    source, described = _model_input_streamed(slide, _patchgd(None), LIMITS, LEVELS)
    source.close()
    assert described["level"] == 2 and described["level_size"] == [128, 128]


def test_a_level_the_upload_lacks_falls_back_to_the_size_rule(tmp_path: Path) -> None:
    assert _training_level(_patchgd(5), LEVELS) is None
    assert _training_level(_patchgd(0), LEVELS) is None
    assert _training_level(_patchgd(2), LEVELS) == 2
    source, described = _model_input_streamed(_slide(tmp_path), _patchgd(5), LIMITS, LEVELS)
    source.close()
    assert described["level"] == 2


def test_baseline_prediction_reads_the_training_level(tmp_path: Path) -> None:
    cfg = BaselineConfig(num_classes=2, backbone="resnet18", image_size=64, pyramid_level=1)
    pixels, described = _whole_image_streamed(_slide(tmp_path), 64, LIMITS, _training_level(cfg, LEVELS))
    assert described["level"] == 1 and pixels.shape == (64, 64, 3) and np.all(pixels == 20)
