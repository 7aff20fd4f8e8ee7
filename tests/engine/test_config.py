"""PatchGD and baseline configs: derived values, validation messages, JSON round-trip."""

from __future__ import annotations

import json

import pytest

from worker.patchgd.config import BaselineConfig, ConfigError, PatchGDConfig, config_from_dict


def test_reference_defaults_resolve_to_one_exact_full_sweep() -> None:
    cfg = PatchGDConfig(num_classes=6, image_size=512, patch_size=128)
    assert cfg.grid.n == 4 and cfg.grid.num_patches == 16
    assert cfg.k == 2  # ceil(16 * 1/8)
    assert cfg.num_inner_iterations == 8
    assert cfg.num_accumulation_steps == 8
    assert cfg.is_exact
    assert cfg.latent_dim == 256 and cfg.lr_backbone == cfg.lr_head == 1e-3 and cfg.warmup_epochs == 2


def test_sampling_and_patches_per_step_drive_k() -> None:
    assert PatchGDConfig(num_classes=2, image_size=320, patch_size=32, sampling=0.1).k == 10
    assert PatchGDConfig(num_classes=2, image_size=320, patch_size=32, sampling=0.3).k == 30
    cfg = PatchGDConfig(num_classes=2, image_size=128, patch_size=32, patches_per_step=5)
    assert cfg.k == 5 and cfg.num_inner_iterations == 4  # ceil(16 / 5)
    stale = PatchGDConfig(num_classes=2, image_size=128, patch_size=32, sampling=0.25, accumulation_steps=1)
    assert stale.num_accumulation_steps == 1 and not stale.is_exact


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 1000, "patch_size": 128}, "image_size 1000 is not a multiple of patch_size 128"),
        ({"sampling": 0.0}, "sampling must be in (0, 1]"),
        ({"sampling": 1.5}, "sampling must be in (0, 1]"),
        ({"sampling": 0.5, "patches_per_step": 2}, "either sampling or patches_per_step"),
        ({"patches_per_step": 17}, "more than the 16 patches of a 4x4 grid"),
        ({"sampling": 0.25, "accumulation_steps": 5}, "accumulation_steps 5 is more than inner_iterations 4"),
        ({"backbone": "vgg99"}, "unknown backbone 'vgg99'"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"batch_size": True}, "batch_size must be a whole number"),
        ({"epochs": 2.5}, "epochs must be a whole number"),
        ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16"),
        ({"head": "mlp"}, "head must be one of reference, pooled, linear"),
        ({"lr_head": 0}, "lr_head must be greater than 0"),
        ({"head_dropout": 1.0}, "head_dropout must be below 1"),
        ({"channels_last": "yes"}, "channels_last must be 'auto', true or false"),
    ],
)
def test_patchgd_validation_messages(changes: dict, message: str) -> None:
    params = {"num_classes": 3, "image_size": 128, "patch_size": 32, **changes}
    with pytest.raises(ConfigError) as info:
        PatchGDConfig(**params)
    assert message in str(info.value)


def test_baseline_validation_messages() -> None:
    with pytest.raises(ConfigError, match="lr must be greater than 0"):
        BaselineConfig(num_classes=2, lr=-1.0)
    with pytest.raises(ConfigError, match="gradient_checkpointing must be true or false"):
        BaselineConfig(num_classes=2, gradient_checkpointing="sometimes")


@pytest.mark.parametrize(
    "cfg",
    [
        PatchGDConfig(
            num_classes=4, backbone="resnet18", image_size=256, patch_size=64, sampling=0.25, seed=7
        ),
        BaselineConfig(num_classes=3, backbone="mobilenet_v2", image_size=224, gradient_checkpointing=True),
    ],
)
def test_json_round_trip(cfg: PatchGDConfig | BaselineConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    assert type(cfg).from_dict(data) == cfg
    assert config_from_dict(cfg.algorithm, data) == cfg


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="unknown hyperparameter.*for patchgd: learning_rate"):
        PatchGDConfig.from_dict({"num_classes": 2, "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="missing hyperparameter"):
        BaselineConfig.from_dict({"backbone": "resnet18"})
    with pytest.raises(ConfigError, match="unknown algorithm 'dino'"):
        config_from_dict("dino", {"num_classes": 2})


def test_precision_and_channels_last_resolve_per_device() -> None:
    cfg = PatchGDConfig(num_classes=2, image_size=128, patch_size=32)
    assert cfg.use_bf16("cuda") and not cfg.use_bf16("cpu")
    assert cfg.use_channels_last("cuda") and not cfg.use_channels_last("cpu")
    forced = BaselineConfig(num_classes=2, precision="fp32", channels_last=True)
    assert not forced.use_bf16("cuda") and forced.use_channels_last("cpu")
