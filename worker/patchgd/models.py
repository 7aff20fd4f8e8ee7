"""Backbones, the PatchGD head and the two trainable models (PatchGD and full-image baseline).

Backbones come from the torchvision catalog built with ``weights=None``: nothing is ever
downloaded. Pretrained weights, if any, are a local file loaded by ``load_weights`` (safetensors
or a weights-only state dict), never an arbitrary pickle.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.checkpoint import checkpoint

from .catalog import BACKBONE_CATALOG
from .errors import WeightsError
from .grid import PatchGrid, PatchSource, as_batch

if TYPE_CHECKING:
    from .config import BaselineConfig, PatchGDConfig


@dataclass(frozen=True)
class BackboneSpec:
    """One catalog entry: how to build the torchvision trunk and where its classifier sits.

    ``classifier`` is the attribute path of the final ImageNet Linear that we replace with an
    identity (so the trunk ends at the pooled feature vector of size ``feature_dim``);
    ``stem`` is the first convolution (replaced when the input is not 3-channel);
    ``ignored_prefixes`` are torchvision checkpoint keys of that classifier, skipped when loading.
    """

    constructor: Callable[..., nn.Module]
    feature_dim: int
    classifier: str
    stem: str
    ignored_prefixes: tuple[str, ...]


# Built from the torch-free catalog, so the names config accepts and the models built are one list.
BACKBONES: dict[str, BackboneSpec] = {
    name: BackboneSpec(
        getattr(tvm, info.constructor), info.feature_dim, info.classifier, info.stem, info.ignored_prefixes
    )
    for name, info in BACKBONE_CATALOG.items()
}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _build_trunk(name: str, in_channels: int) -> nn.Module:
    """A torchvision model (random init) that outputs its pooled feature vector."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    trunk = spec.constructor(weights=None)
    _set_submodule(trunk, spec.classifier, nn.Identity())
    if in_channels != 3:
        stem = trunk.get_submodule(spec.stem)
        assert isinstance(stem, nn.Conv2d)
        _set_submodule(
            trunk,
            spec.stem,
            nn.Conv2d(
                in_channels,
                stem.out_channels,
                kernel_size=stem.kernel_size,  # type: ignore[arg-type]
                stride=stem.stride,  # type: ignore[arg-type]
                padding=stem.padding,  # type: ignore[arg-type]
                bias=stem.bias is not None,
            ),
        )
    return trunk


class Backbone(nn.Module):
    """A torchvision trunk (global pool kept) followed by a Linear projection to the latent size."""

    def __init__(self, name: str, latent_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.name = name
        self.trunk = _build_trunk(name, in_channels)
        self.proj = nn.Linear(BACKBONES[name].feature_dim, latent_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches ``[N, C, P, P]`` to latent vectors ``[N, D]``."""
        return self.proj(self.trunk(patches))


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a weights-only torch file; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path.name} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path.name} is not a valid safetensors file: {exc}") from exc
    try:
        with warnings.catch_warnings():
            # Raw pickles (not torch.save zips) of protocol > 2 make torch warn before it checks
            # them; the file is judged by whether the safe unpickler accepts it, not by that note.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path.name} was refused: it is not a plain weights file (it contains Python objects that "
            "would run code when loaded). Save a state_dict with torch.save or use .safetensors."
        ) from exc
    except Exception as exc:  # the safe unpickler fails in many ways on junk (even IndexError)
        raise WeightsError(f"{path.name} could not be read as a PyTorch weights file: {exc}") from exc
    # Training scripts often wrap the weights in {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path.name} does not contain a state dict (a mapping of names to tensors)")
    return obj


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:10]) + (f" (and {len(items) - 10} more)" if len(items) > 10 else "")
            parts.append(f"{title}: {shown}")
    return "; ".join(parts)


def _as_model_keys(
    module: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Map a file's keys onto ``module``'s and say which of the module's keys may stay fresh.

    A ``Backbone`` or ``BaselineModel`` accepts our own exports (``trunk.*`` keys) or a plain
    torchvision state dict of the same architecture (its ImageNet classifier is skipped). Only the
    trunk is required: the backbone projection / baseline classifier keep their initialisation
    when the file does not have them.
    """
    if not isinstance(module, Backbone | BaselineModel):
        return state, set()
    own_head = "proj." if isinstance(module, Backbone) else "classifier."
    if any(k.startswith("trunk.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith(("trunk.", own_head))}
    else:
        ignored = BACKBONES[module.name].ignored_prefixes
        state = {f"trunk.{k}": v for k, v in state.items() if not k.startswith(ignored)}
    return state, {k for k in module.state_dict() if k.startswith(own_head)}


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``module``, checking every key and shape first.

    The file is ``.safetensors`` or a ``torch.save``-d state dict read with ``weights_only=True``
    (a pickle that would run code is refused). Any missing key, unexpected key or shape mismatch
    raises ``WeightsError`` listing them, and nothing is loaded.
    """
    state, allowed_missing = _as_model_keys(module, _read_state_dict(path))
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in allowed_missing)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        problems = _describe_mismatch(missing, unexpected, shapes)
        raise WeightsError(f"{Path(path).name} does not match this architecture: {problems}")
    module.load_state_dict(state, strict=False)


def build_backbone(
    name: str, latent_dim: int, *, weights_path: str | Path | None = None, in_channels: int = 3
) -> Backbone:
    """A catalog backbone projecting to ``latent_dim``, optionally initialised from a local file."""
    backbone = Backbone(name, latent_dim, in_channels)
    if weights_path is not None:
        load_weights(backbone, weights_path)
    return backbone


# Three stride-2 convolutions shrink an n x n map to ceil(n / 8); padding Z to at least 9 x 9
# keeps the last map at least 2 x 2, so BatchNorm always sees more than one value per channel,
# even for a single image on a small grid (n = 2..8).
_HEAD_MIN_GRID = 9


class PatchGDHead(nn.Module):
    """Classifier over the latent map Z ``[B, D, n, n]``.

    ``reference``: one Conv3x3 stride-1 block, then three Conv3x3 stride-2 blocks (each Conv ->
    ReLU -> BatchNorm -> Dropout2d), flatten, Linear. Every conv pads by 1, so each stride-2 block
    maps size m to ceil(m / 2) and never to zero; grids smaller than 9 x 9 are zero-padded on the
    bottom and right to 9 x 9 first (see ``_HEAD_MIN_GRID``).
    ``pooled``: two Conv3x3 stride-1 blocks (Conv -> BatchNorm -> ReLU) that combine each cell
    with its neighbours (a digit cut by patch borders is assembled here), then a global average
    pool, Dropout and Linear. Like the full-image baseline's pooled classifier it is the same
    function at every grid position, so what it learns about a digit in one place holds anywhere.
    ``linear``: global average pool of Z, Dropout, Linear (no spatial reasoning; cheap).
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        grid_n: int,
        *,
        kind: str = "reference",
        width: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.grid_n = grid_n
        if kind == "reference":
            blocks: list[nn.Module] = []
            channels = latent_dim
            for stride in (1, 2, 2, 2):
                blocks += [
                    nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1),
                    nn.ReLU(inplace=True),
                    nn.BatchNorm2d(width),
                    nn.Dropout2d(dropout),
                ]
                channels = width
            self.features = nn.Sequential(*blocks)
            side = max(grid_n, _HEAD_MIN_GRID)
            for _ in range(3):
                side = (side + 1) // 2
            self.classifier = nn.Linear(width * side * side, num_classes)
        elif kind == "pooled":
            blocks = []
            channels = latent_dim
            for _ in range(2):
                blocks += [
                    nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
            self.classifier = nn.Linear(width, num_classes)
        elif kind == "linear":
            self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
            self.classifier = nn.Linear(latent_dim, num_classes)
        else:
            raise ValueError(f"unknown head {kind!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent map ``[B, D, n, n]`` to logits ``[B, classes]``."""
        if self.kind == "reference" and self.grid_n < _HEAD_MIN_GRID:
            pad = _HEAD_MIN_GRID - self.grid_n
            z = F.pad(z, (0, pad, 0, pad))
        elif self.kind == "pooled" and self.grid_n == 1:
            # A 1 x 1 grid of one image would leave BatchNorm a single value per channel.
            z = F.pad(z, (0, 1, 0, 1))
        return self.classifier(torch.flatten(self.features(z), 1))


class PatchGDModel(nn.Module):
    """Backbone f (patch -> latent vector) + head g (latent map -> logits) on a fixed grid."""

    def __init__(self, backbone: Backbone, head: PatchGDHead, grid: PatchGrid) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.grid = grid
        self.latent_dim = backbone.proj.out_features

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches ``[N, C, P, P]`` to latent vectors ``[N, D]``."""
        return self.backbone(patches)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Latent map ``[B, D, n, n]`` to logits ``[B, classes]``."""
        return self.head(z)

    def fill_latent(
        self, source: PatchSource, chunk_order: Iterable[torch.Tensor], *, channels_last: bool = False
    ) -> torch.Tensor:
        """Z ``[B, D, n, n]`` with every chunk of positions in ``chunk_order`` encoded, chunk by chunk.

        Meant for ``torch.no_grad`` (the PatchGD fill pass and prediction): only one chunk of
        patches is in memory at a time, so a streaming source never materialises the image. Z is
        kept in the parameters' dtype (float32) even under bf16 autocast: it is tiny, and the head
        then sees the same values whatever precision the backbone ran in.
        """
        grid = source.grid
        parameter = next(self.parameters())
        z = torch.zeros(
            source.batch_size, self.latent_dim, grid.n, grid.n, device=parameter.device, dtype=parameter.dtype
        )
        for chunk in chunk_order:
            patches = source.patches(chunk)
            batch, k = patches.shape[:2]
            features = self.encode(as_batch(patches, parameter.device, channels_last)).reshape(batch, k, -1)
            grid.scatter(z, chunk, features)
        return z

    def latent_map(self, images: torch.Tensor) -> torch.Tensor:
        """Z ``[B, D, n, n]`` of full images, every patch encoded in one batch (row-major cells)."""
        batch, n = images.shape[0], self.grid.n
        features = self.encode(self.grid.all_patches(images))
        return features.reshape(batch, n, n, -1).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Full-image patch-decomposed forward: logits ``[B, classes]`` of images ``[B, C, S, S]``.

        Used by export and as the reference the PatchGD gradient is checked against; chunked,
        memory-bounded prediction lives in ``infer.predict``.
        """
        return self.classify(self.latent_map(images))


class BaselineModel(nn.Module):
    """The full-image baseline: a catalog trunk on the whole image and a Linear classifier."""

    def __init__(
        self, name: str, num_classes: int, *, in_channels: int = 3, gradient_checkpointing: bool = False
    ):
        super().__init__()
        self.name = name
        self.trunk = _build_trunk(name, in_channels)
        self.classifier = nn.Linear(BACKBONES[name].feature_dim, num_classes)
        self.gradient_checkpointing = gradient_checkpointing

    def _stages(self) -> list[nn.Module]:
        """The trunk's large sequential stages, the units recomputed under checkpointing."""
        if isinstance(self.trunk, tvm.ResNet):
            return [self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4]
        return list(self.trunk.features)  # type: ignore[arg-type]

    def _checkpointed_trunk(self, x: torch.Tensor) -> torch.Tensor:
        # Activations inside each stage are dropped after forward and recomputed in backward:
        # memory falls to roughly the stage boundaries at the cost of one more forward.
        trunk = self.trunk
        if isinstance(trunk, tvm.ResNet):
            x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
        for stage in self._stages():
            x = checkpoint(stage, x, use_reentrant=False)
        if isinstance(trunk, tvm.ResNet):
            return torch.flatten(trunk.avgpool(x), 1)
        if isinstance(trunk, tvm.ConvNeXt):
            return trunk.classifier(trunk.avgpool(x))
        return trunk.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` to logits ``[B, classes]``."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            features = self._checkpointed_trunk(images)
        else:
            features = self.trunk(images)
        return self.classifier(features)


def build_patchgd_model(cfg: PatchGDConfig, *, load_pretrained: bool = True) -> PatchGDModel:
    """The PatchGD model a config describes (pretrained backbone weights loaded if configured)."""
    weights = cfg.pretrained_weights if load_pretrained else None
    backbone = build_backbone(cfg.backbone, cfg.latent_dim, weights_path=weights, in_channels=cfg.in_channels)
    grid = cfg.grid
    head = PatchGDHead(
        cfg.latent_dim, cfg.num_classes, grid.n, kind=cfg.head, width=cfg.head_width, dropout=cfg.head_dropout
    )
    return PatchGDModel(backbone, head, grid)


def build_baseline_model(cfg: BaselineConfig, *, load_pretrained: bool = True) -> BaselineModel:
    """The baseline model a config describes (pretrained trunk weights loaded if configured)."""
    model = BaselineModel(
        cfg.backbone,
        cfg.num_classes,
        in_channels=cfg.in_channels,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    if load_pretrained and cfg.pretrained_weights is not None:
        load_weights(model, cfg.pretrained_weights)
    return model
