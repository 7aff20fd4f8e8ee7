"""Hyperparameters for PatchGD and the full-image baseline.

Both configs validate themselves on construction and round-trip through plain JSON dicts, so the
API can store them, the worker can rebuild them and a checkpoint can record them. Error messages
name the field and say what a valid value looks like.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .catalog import BACKBONE_CATALOG, list_backbones
from .errors import ConfigError

if TYPE_CHECKING:
    from .grid import PatchGrid

PRECISIONS = ("auto", "fp32", "bf16")
#: Pixels an image (or the pyramid level read of it) may have to be decoded whole for training:
#: Pillow's own default limit (~89.5 megapixels), what ``data.DEFAULT_MAX_PIXELS`` is. Torch-free,
#: so that the web process can say which pyramid levels are small enough to train from.
IN_MEMORY_MAX_PIXELS = 89_478_485
#: Highest pyramid level index accepted (slides have a handful; the check only bounds the value).
MAX_PYRAMID_LEVEL = 31
HEADS = ("reference", "pooled", "linear")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def _check_float(name: str, value: Any, minimum: float = 0.0, *, exclusive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        bound = "greater than" if exclusive else "at least"
        raise ConfigError(f"{name} must be {bound} {minimum}, got {value}")


def _check_common(cfg: Any) -> None:
    """Checks shared by both algorithms."""
    _check_int("num_classes", cfg.num_classes, 2)
    if not isinstance(cfg.backbone, str) or cfg.backbone not in BACKBONE_CATALOG:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; choose one of {', '.join(list_backbones())}")
    _check_int("image_size", cfg.image_size, 8)
    if cfg.pyramid_level is not None:
        _check_int("pyramid_level", cfg.pyramid_level, 0)
        if cfg.pyramid_level > MAX_PYRAMID_LEVEL:
            raise ConfigError(f"pyramid_level must be at most {MAX_PYRAMID_LEVEL}, got {cfg.pyramid_level}")
    _check_int("epochs", cfg.epochs, 1)
    _check_int("batch_size", cfg.batch_size, 1)
    _check_int("warmup_epochs", cfg.warmup_epochs, 0)
    _check_float("weight_decay", cfg.weight_decay, 0.0)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.channels_last not in ("auto", True, False):
        raise ConfigError(f"channels_last must be 'auto', true or false, got {cfg.channels_last!r}")
    _check_int("seed", cfg.seed, 0)
    _check_int("in_channels", cfg.in_channels, 1)
    if cfg.pretrained_weights is not None and not isinstance(cfg.pretrained_weights, str):
        raise ConfigError("pretrained_weights must be a file path or empty")
    if cfg.checkpoint_every_minutes is not None:
        _check_float("checkpoint_every_minutes", cfg.checkpoint_every_minutes, 0.0, exclusive=True)
    _check_int("bn_recalibration_batches", cfg.bn_recalibration_batches, 0)


class _ConfigMixin:
    """JSON round-trip and device-dependent resolution shared by both configs."""

    algorithm: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Build (and validate) a config from a dict; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ConfigError("hyperparameters must be a JSON object")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown hyperparameter(s) for {cls.algorithm}: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"missing hyperparameter: {exc}") from exc

    def use_bf16(self, device_type: str) -> bool:
        """Whether to autocast to bf16: 'auto' means on CUDA only (CPU bf16 is slow and lossy)."""
        if self.precision == "auto":  # type: ignore[attr-defined]
            return device_type == "cuda"
        return self.precision == "bf16"  # type: ignore[attr-defined]

    def use_channels_last(self, device_type: str) -> bool:
        """Whether to use channels_last memory format: 'auto' means on CUDA (tensor cores) only."""
        if self.channels_last == "auto":  # type: ignore[attr-defined]
            return device_type == "cuda"
        return bool(self.channels_last)  # type: ignore[attr-defined]


@dataclass
class PatchGDConfig(_ConfigMixin):
    """PatchGD hyperparameters (defaults follow the reference implementation).

    ``sampling`` (fraction of the grid) or ``patches_per_step`` (k) sets how many patches are
    re-encoded with gradients per inner iteration; give at most one (neither means sampling 1/8).
    ``inner_iterations`` defaults to one full sweep, ceil(n*n / k).
    ``accumulation_steps`` (eps) is how many inner iterations share one optimizer step; it defaults
    to ``inner_iterations`` (a full sweep per step: the exact full-image gradient) and 1 gives the
    reference's stale-Z regime. Any value from 1 to ``inner_iterations`` is accepted; when it does
    not divide ``inner_iterations`` the last, shorter window is averaged over its own length.
    """

    algorithm: ClassVar[str] = "patchgd"

    num_classes: int
    backbone: str = "resnet50"
    image_size: int = 512
    # The pyramid level training images are read from (0: full resolution; level L of a pyramidal
    # TIFF or slide is its L-th reduced page), then resized to image_size. None: level 0.
    pyramid_level: int | None = None
    patch_size: int = 128
    sampling: float | None = None
    patches_per_step: int | None = None
    inner_iterations: int | None = None
    accumulation_steps: int | None = None
    latent_dim: int = 256
    head: str = "pooled"
    head_width: int = 256
    head_dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 4
    lr_backbone: float = 1e-3
    lr_head: float = 1e-3
    warmup_epochs: int = 2
    weight_decay: float = 0.0
    precision: str = "auto"
    channels_last: str | bool = "auto"
    seed: int = 0
    per_image_positions: bool = False
    pretrained_weights: str | None = None
    in_channels: int = 3
    # Also write a checkpoint mid-epoch once this many minutes passed since the last one (None: only
    # at epoch ends). Fractions are fine. Operational, not a hyperparameter: a resume may change it.
    checkpoint_every_minutes: float | None = None
    # At every epoch's end, BatchNorm running statistics are re-estimated for the current weights
    # from this many training batches, in dataset order (0: off). Without it they lag the weights
    # by about ten steps, and evaluation at a high learning rate sees another network.
    bn_recalibration_batches: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` with a readable message if any value is unusable."""
        _check_common(self)
        _check_int("patch_size", self.patch_size, 8)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.sampling is not None and self.patches_per_step is not None:
            raise ConfigError("give either sampling or patches_per_step, not both")
        if self.sampling is not None and (
            isinstance(self.sampling, bool)
            or not isinstance(self.sampling, int | float)
            or not 0 < self.sampling <= 1
        ):
            raise ConfigError(f"sampling must be in (0, 1], got {self.sampling!r}")
        num_patches = self.num_patches
        if self.patches_per_step is not None:
            _check_int("patches_per_step", self.patches_per_step, 1)
            if self.patches_per_step > num_patches:
                raise ConfigError(
                    f"patches_per_step {self.patches_per_step} is more than the {num_patches} patches "
                    f"of a {self.n}x{self.n} grid"
                )
        if self.inner_iterations is not None:
            _check_int("inner_iterations", self.inner_iterations, 1)
        if self.accumulation_steps is not None:
            _check_int("accumulation_steps", self.accumulation_steps, 1)
            if self.accumulation_steps > self.num_inner_iterations:
                raise ConfigError(
                    f"accumulation_steps {self.accumulation_steps} is more than inner_iterations "
                    f"{self.num_inner_iterations}"
                )
        _check_int("latent_dim", self.latent_dim, 1)
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        _check_int("head_width", self.head_width, 1)
        _check_float("head_dropout", self.head_dropout, 0.0)
        if self.head_dropout >= 1:
            raise ConfigError(f"head_dropout must be below 1, got {self.head_dropout}")
        _check_float("lr_backbone", self.lr_backbone, 0.0, exclusive=True)
        _check_float("lr_head", self.lr_head, 0.0, exclusive=True)
        if not isinstance(self.per_image_positions, bool):
            raise ConfigError("per_image_positions must be true or false")

    @property
    def n(self) -> int:
        """Patches per side of the grid (pure arithmetic: validation never needs torch)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches in the whole grid, n * n."""
        return self.n * self.n

    @property
    def grid(self) -> PatchGrid:
        """The patch grid these sizes define (the torch-side object that cuts and places patches)."""
        from .grid import PatchGrid  # imported here so that validating a config never loads torch

        return PatchGrid(self.image_size, self.patch_size)

    @property
    def k(self) -> int:
        """Patches re-encoded with gradients per inner iteration."""
        if self.patches_per_step is not None:
            return self.patches_per_step
        sampling = 0.125 if self.sampling is None else self.sampling
        # The small epsilon keeps e.g. 0.1 * 100 from rounding up to 11 through float error.
        return max(1, math.ceil(self.num_patches * sampling - 1e-9))

    @property
    def num_inner_iterations(self) -> int:
        """Inner iterations per outer step (default: one full sweep of the grid)."""
        if self.inner_iterations is not None:
            return self.inner_iterations
        return math.ceil(self.num_patches / self.k)

    @property
    def num_accumulation_steps(self) -> int:
        """Inner iterations per optimizer step (default: all of them, the exact regime)."""
        if self.accumulation_steps is not None:
            return self.accumulation_steps
        return self.num_inner_iterations

    @property
    def is_exact(self) -> bool:
        """True when one outer step is exactly one full-image gradient step."""
        sweep = math.ceil(self.num_patches / self.k)
        return self.num_inner_iterations == sweep and self.num_accumulation_steps == sweep


@dataclass
class BaselineConfig(_ConfigMixin):
    """Full-image baseline: one backbone and a linear classifier trained on the whole image."""

    algorithm: ClassVar[str] = "baseline"

    num_classes: int
    backbone: str = "resnet50"
    image_size: int = 512
    # The pyramid level training images are read from (0: full resolution; level L of a pyramidal
    # TIFF or slide is its L-th reduced page), then resized to image_size. None: level 0.
    pyramid_level: int | None = None
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    warmup_epochs: int = 2
    weight_decay: float = 0.0
    precision: str = "auto"
    channels_last: str | bool = "auto"
    seed: int = 0
    gradient_checkpointing: bool = False
    pretrained_weights: str | None = None
    in_channels: int = 3
    # Also write a checkpoint mid-epoch once this many minutes passed since the last one (None: only
    # at epoch ends). Fractions are fine. Operational, not a hyperparameter: a resume may change it.
    checkpoint_every_minutes: float | None = None
    # At every epoch's end, BatchNorm running statistics are re-estimated for the current weights
    # from this many training batches, in dataset order (0: off). Without it they lag the weights
    # by about ten steps, and evaluation at a high learning rate sees another network.
    bn_recalibration_batches: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` with a readable message if any value is unusable."""
        _check_common(self)
        _check_float("lr", self.lr, 0.0, exclusive=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError("gradient_checkpointing must be true or false")


ALGORITHMS: dict[str, type[PatchGDConfig] | type[BaselineConfig]] = {
    "patchgd": PatchGDConfig,
    "baseline": BaselineConfig,
}


def config_from_dict(algorithm: str, data: dict[str, Any]) -> PatchGDConfig | BaselineConfig:
    """Build the config of the named algorithm ('patchgd' or 'baseline') from a JSON dict."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algorithm].from_dict(data)
