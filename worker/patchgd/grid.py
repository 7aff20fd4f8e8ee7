"""The patch grid: how an S x S image is cut into an n x n grid of P x P patches.

One layout is used everywhere (training, inference, export): patch ``index`` sits at
``row = index // n``, ``col = index % n`` (row-major), covers pixels
``[row*P:(row+1)*P, col*P:(col+1)*P]`` and its feature vector lives in the latent cell
``Z[:, :, row, col]``. The public reference walks the grid column-major and writes Z transposed;
mixing the two layouts between training and inference silently scrambles the latent map, so this
module is the single place that defines it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import ImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _channel_stats(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std for RGB; their channel average for any other channel count.

    Torchvision backbones are trained on ImageNet-normalised RGB, so RGB keeps the exact
    statistics; grayscale or multi-band images get the averaged values so that every channel
    lands in the same numeric range.
    """
    if channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean = (sum(IMAGENET_MEAN) / 3,) * channels
        std = (sum(IMAGENET_STD) / 3,) * channels
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def normalize_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 pixels (HWC or BHWC) into normalised float32 (CHW or BCHW).

    This is the one conversion from stored pixels to network input; datasets, streaming readers
    and prediction all call it so the model always sees the same scale.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {tensor.dtype}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim not in (3, 4):
        raise ValueError(f"expected an HWC or BHWC image, got shape {tuple(tensor.shape)}")
    channels = tensor.shape[-1]
    mean, std = _channel_stats(channels)
    mean, std = mean.to(tensor.device), std.to(tensor.device)
    scaled = (tensor.float() / 255.0 - mean) / std
    return scaled.movedim(-1, -3).contiguous()


@dataclass(frozen=True)
class PatchGrid:
    """A non-overlapping grid of ``patch_size`` patches over an ``image_size`` square image."""

    image_size: int
    patch_size: int

    def __post_init__(self) -> None:
        if self.patch_size <= 0 or self.image_size <= 0:
            raise ValueError("image_size and patch_size must be positive")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def n(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches in the whole grid (n * n)."""
        return self.n * self.n

    def coords(self, index: int) -> tuple[int, int]:
        """Row and column of a patch index (row-major)."""
        if not 0 <= index < self.num_patches:
            raise IndexError(f"patch index {index} outside a grid of {self.num_patches} patches")
        return index // self.n, index % self.n

    def rows_cols(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column tensors for a tensor of patch indices (any shape)."""
        return torch.div(indices, self.n, rounding_mode="floor"), indices % self.n

    def extract(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Cut patches out of a batch of images.

        ``images`` is ``[B, C, S, S]``; ``indices`` is ``[k]`` (same positions for every image)
        or ``[B, k]`` (per-image positions). Returns ``[B, k, C, P, P]``. Only the requested
        patches are copied, so the cost is k patches, not the whole image.
        """
        if images.ndim != 4 or images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ImageError(
                f"expected images of shape [B, C, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        batch = images.shape[0]
        indices = indices.to(device=images.device, dtype=torch.long)
        if indices.ndim == 1:
            indices = indices.unsqueeze(0).expand(batch, -1)
        elif indices.ndim != 2 or indices.shape[0] != batch:
            raise ValueError(f"indices must be [k] or [{batch}, k], got {tuple(indices.shape)}")
        rows, cols = self.rows_cols(indices)
        p = self.patch_size
        # [B, C, n, P, n, P] is a pure view; advanced indexing on the two grid axes (separated by a
        # slice) moves them to the front: result [B, k, C, P, P].
        tiles = images.unflatten(2, (self.n, p)).unflatten(4, (self.n, p))
        batch_index = torch.arange(batch, device=images.device).unsqueeze(1)
        return tiles[batch_index, :, rows, :, cols]

    def scatter(self, z: torch.Tensor, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Write features ``[B, k, D]`` into the latent map ``z`` ``[B, D, n, n]`` in place.

        ``indices`` is ``[k]`` or ``[B, k]`` as for ``extract``; cell (row, col) of patch i is
        ``z[:, :, i // n, i % n]``. Features are cast to Z's dtype (bf16 autocast output into a
        float32 Z) and keep their autograd graph.
        """
        rows, cols = self.rows_cols(indices.to(z.device))
        features = features.to(z.dtype)
        if indices.ndim == 1:
            z[:, :, rows, cols] = features.transpose(1, 2)
        else:
            batch_index = torch.arange(z.shape[0], device=z.device).unsqueeze(1)
            z[batch_index, :, rows, cols] = features

    def all_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Every patch of every image in row-major order: ``[B * n * n, C, P, P]``.

        Traceable (no data-dependent indexing), so the exported full-image forward uses it.
        """
        batch, channels = images.shape[0], images.shape[1]
        p, n = self.patch_size, self.n
        tiles = images.reshape(batch, channels, n, p, n, p).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(batch * n * n, channels, p, p)


def as_batch(patches: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``[B, k, C, P, P]`` patches as one ``[B*k, C, P, P]`` network batch on ``device``."""
    flat = patches.to(device, non_blocking=True).flatten(0, 1)
    return flat.contiguous(memory_format=torch.channels_last) if channels_last else flat


@runtime_checkable
class PatchSource(Protocol):
    """Anything that can hand out normalised patches of a batch of images by grid index.

    The training loop and ``predict`` only ever ask for k patches at a time, so a source may
    read them lazily from disk (streaming) instead of holding the whole image.
    """

    batch_size: int
    grid: PatchGrid

    def patches(self, indices: torch.Tensor) -> torch.Tensor:
        """Patches ``[B, k, C, P, P]`` (float32, normalised) for ``[k]`` or ``[B, k]`` indices."""
        ...


class TensorPatchSource:
    """A ``PatchSource`` over a batch of images already in memory as ``[B, C, S, S]``."""

    def __init__(self, images: torch.Tensor, grid: PatchGrid) -> None:
        if images.ndim != 4 or images.shape[-2:] != (grid.image_size, grid.image_size):
            raise ImageError(
                f"expected images of shape [B, C, {grid.image_size}, {grid.image_size}], "
                f"got {tuple(images.shape)}"
            )
        self.images = images
        self.grid = grid
        self.batch_size = images.shape[0]

    def patches(self, indices: torch.Tensor) -> torch.Tensor:
        """Patches ``[B, k, C, P, P]`` cut from the in-memory images."""
        return self.grid.extract(self.images, indices)
