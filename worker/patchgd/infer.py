"""Prediction with bounded memory: Z is filled chunk by chunk, then the head runs once."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import ImageError
from .grid import PatchSource, TensorPatchSource
from .models import BaselineModel, PatchGDModel


def predict(
    model: nn.Module,
    source: PatchSource | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities ``[B, classes]`` (float32, on CPU) for a batch of images.

    See ``predict_logits`` for how the work is chunked.
    """
    logits = predict_logits(
        model, source, device=device, chunk_size=chunk_size, autocast_dtype=autocast_dtype
    )
    return torch.softmax(logits, dim=1)


def predict_logits(
    model: nn.Module,
    source: PatchSource | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits ``[B, classes]`` (float32, on CPU) for a batch of images.

    PatchGD models take a ``PatchSource`` (or a ``[B, C, S, S]`` tensor): Z is filled in eval mode
    ``chunk_size`` patch positions at a time (default: one grid row), so a streaming source never
    materialises the image and activation memory stays at one chunk. Baseline models take a
    tensor and run ``chunk_size`` images at a time (default: the whole batch). The model is moved
    to ``device`` when one is given and left in eval mode.
    """
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        if isinstance(model, PatchGDModel):
            if isinstance(source, torch.Tensor):
                source = TensorPatchSource(source, model.grid)
            if source.grid != model.grid:
                trained, given = model.grid, source.grid
                raise ImageError(
                    f"the model was trained on a {trained.image_size}px image with {trained.patch_size}px "
                    f"patches, the input is {given.image_size}px with {given.patch_size}px patches"
                )
            step = chunk_size or model.grid.n
            order = torch.arange(model.grid.num_patches).split(step)
            z = model.fill_latent(source, order)
            logits = model.classify(z)
        elif isinstance(model, BaselineModel):
            if not isinstance(source, torch.Tensor):
                raise TypeError("the full-image baseline needs the images as a tensor, not a patch source")
            step = chunk_size or max(1, source.shape[0])
            logits = torch.cat([model(part.to(device)) for part in source.split(step)])
        else:
            raise TypeError(f"cannot predict with a {type(model).__name__}")
    return logits.float().cpu()
