"""Prediction with bounded memory: Z is filled chunk by chunk, then the head runs once; and the
per-cell evidence of a PatchGD prediction (occlusion of each cell's latent in Z, head only)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


#: What replaces a cell's latent vector when its evidence is measured (see ``patch_evidence``).
OCCLUSION_BASELINES = ("mean", "zero")


@dataclass(frozen=True)
class PatchEvidence:
    """How much each grid cell of one image supports a class of a PatchGD model's prediction.

    ``probabilities`` ``[classes]`` are the model's class probabilities for the image; ``target``
    the class explained (the predicted one unless asked otherwise); ``evidence`` ``[n, n]`` (grid
    layout, ``evidence[row, col]``) the drop in the target's probability when that cell's latent
    vector is occluded: positive where the cell supports the target, negative where it speaks
    against it. ``baseline`` says what replaced the occluded cell.
    """

    probabilities: torch.Tensor
    target: int
    evidence: torch.Tensor
    baseline: str


def patch_evidence(
    model: PatchGDModel,
    source: PatchSource | torch.Tensor,
    *,
    target: int | None = None,
    baseline: str = "mean",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> PatchEvidence:
    """Per-cell evidence for one image's predicted class, by occluding each cell's latent in Z.

    Z is filled once, chunk by chunk, exactly as ``predict`` does (a streaming source is read once
    and never materialised). Then every cell ``(row, col)`` gets a copy of Z where only that cell's
    latent vector is replaced by the ``baseline``, and only the head runs on those copies,
    ``batch_size`` of them at a time: the backbone never runs again, so the cost is ``n * n`` head
    passes, tiny next to encoding the patches.

    The baseline is ``"mean"`` by default: the average latent vector of this image's cells, a
    "typical patch of this image" that stays inside what the head saw in training, so a cell scores
    by how much it differs from the rest of its image. ``"zero"`` (an all-zero latent) is the
    other common choice; the projection's output has no natural zero, so a zero cell is itself
    unusual input to the head and its scores mix "this cell matters" with "a hole is odd".
    Occlusion in Z (not in pixels) measures exactly what the head reads from each cell, with no
    choice of a fill colour and no extra backbone passes.
    """
    if not isinstance(model, PatchGDModel):
        raise TypeError(f"patch evidence needs a PatchGD model, not a {type(model).__name__}")
    if baseline not in OCCLUSION_BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(OCCLUSION_BASELINES)}, not {baseline!r}")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    if isinstance(source, torch.Tensor):
        source = TensorPatchSource(source, model.grid)
    if source.batch_size != 1:
        raise ValueError(f"patch evidence explains one image at a time, got a batch of {source.batch_size}")
    if source.grid != model.grid:
        trained, given = model.grid, source.grid
        raise ImageError(
            f"the model was trained on a {trained.image_size}px image with {trained.patch_size}px "
            f"patches, the input is {given.image_size}px with {given.patch_size}px patches"
        )
    n = model.grid.n
    with torch.no_grad():
        order = torch.arange(model.grid.num_patches).split(chunk_size or n)
        z = model.fill_latent(source, order)
        probabilities = torch.softmax(model.classify(z).float(), dim=1)[0]
        chosen = int(probabilities.argmax()) if target is None else int(target)
        if not 0 <= chosen < probabilities.shape[0]:
            raise ValueError(
                f"target {chosen} is not a class of this model ({probabilities.shape[0]} classes)"
            )
        fill = z.mean(dim=(2, 3))[0] if baseline == "mean" else torch.zeros_like(z[0, :, 0, 0])
        drops = torch.empty(n * n)
        for start in range(0, n * n, batch_size):
            cells = torch.arange(start, min(start + batch_size, n * n))
            occluded = z.expand(len(cells), -1, -1, -1).clone()
            rows, cols = model.grid.rows_cols(cells)
            occluded[torch.arange(len(cells)), :, rows, cols] = fill
            probs = torch.softmax(model.classify(occluded).float(), dim=1)[:, chosen]
            drops[start : start + len(cells)] = probabilities[chosen].cpu() - probs.cpu()
    return PatchEvidence(
        probabilities=probabilities.cpu(), target=chosen, evidence=drops.reshape(n, n), baseline=baseline
    )
