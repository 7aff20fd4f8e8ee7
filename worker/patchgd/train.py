"""PatchGD and baseline training: one-step functions and the shared epoch loop.

The step functions are the whole algorithm; ``train`` is bookkeeping around them (seeding,
schedules, progress, evaluation, checkpoints, cancellation). Read ``patchgd_step`` first.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import BaselineConfig, PatchGDConfig
from .grid import PatchSource


@dataclass
class StepStats:
    """What one outer step did: mean unscaled loss, work done, optimizer steps, wall time."""

    loss: float
    num_images: int
    num_patches_encoded: int
    optimizer_steps: int
    seconds: float


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 autocast output is upcast, float64 (gradient checks) is kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_context(cfg: PatchGDConfig | BaselineConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when the config asks for it on this device, otherwise a no-op."""
    if cfg.use_bf16(device.type):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: nn.Module, cfg: PatchGDConfig | BaselineConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per part (backbone, head) so each has its own learning rate.

    With ``weight_decay = 0`` (the default) AdamW is exactly the reference's Adam.
    """
    if isinstance(cfg, PatchGDConfig):
        groups = [
            {"params": list(model.backbone.parameters()), "lr": cfg.lr_backbone, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": cfg.lr_head, "name": "head"},
        ]
    else:
        groups = [{"params": list(model.parameters()), "lr": cfg.lr, "name": "model"}]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at a step: linear warmup to 1, then linear decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: PatchGDConfig | BaselineConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (one step per mini-batch): ``warmup_epochs`` of warmup, then decay."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps=warmup, total_steps=total)
    )


def _patch_order(
    num_patches: int, batch: int, per_image: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """A random permutation of the grid: ``[num_patches]`` shared or ``[B, num_patches]`` per image."""
    if per_image:
        return torch.stack([torch.randperm(num_patches, generator=generator) for _ in range(batch)])
    return torch.randperm(num_patches, generator=generator)


def _chunks(order: torch.Tensor, k: int) -> list[torch.Tensor]:
    return list(order.split(k, dim=-1))


def _inner_chunks(
    num_patches: int, k: int, count: int, batch: int, per_image: bool, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    """``count`` chunks of k positions, sweeping fresh permutations of the grid as needed."""
    produced = 0
    while produced < count:
        for chunk in _chunks(_patch_order(num_patches, batch, per_image, generator), k):
            if produced == count:
                return
            produced += 1
            yield chunk


def _prepare(patches: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``[B, k, C, P, P]`` patches as one ``[B*k, C, P, P]`` batch on the model's device."""
    flat = patches.to(device, non_blocking=True).flatten(0, 1)
    return flat.contiguous(memory_format=torch.channels_last) if channels_last else flat


def _write_cells(z: torch.Tensor, chunk: torch.Tensor, features: torch.Tensor, grid_n: int) -> None:
    """Write features ``[B, k, D]`` into Z ``[B, D, n, n]`` at the chunk's cells (in place)."""
    rows = torch.div(chunk, grid_n, rounding_mode="floor").to(z.device)
    cols = (chunk % grid_n).to(z.device)
    features = features.to(z.dtype)
    if chunk.ndim == 1:
        z[:, :, rows, cols] = features.transpose(1, 2)
    else:
        batch_index = torch.arange(z.shape[0], device=z.device).unsqueeze(1)
        z[batch_index, :, rows, cols] = features


def fill_latent(
    model: nn.Module,
    source: PatchSource,
    chunk_order: Iterable[torch.Tensor],
    *,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """Z ``[B, D, n, n]`` (parameter dtype, no graph) with every listed chunk encoded.

    Z stays in the parameters' dtype (float32) even under bf16 autocast: it is tiny, and the
    head then sees the same values whatever precision the backbone ran in.

    Called under ``torch.no_grad``: only k patches' activations exist at any time.
    """
    grid = source.grid
    dtype = next(model.parameters()).dtype
    z = torch.zeros(source.batch_size, model.latent_dim, grid.n, grid.n, device=device, dtype=dtype)
    for chunk in chunk_order:
        patches = source.patches(chunk)
        batch, k = patches.shape[:2]
        features = model.encode(_prepare(patches, device, channels_last)).reshape(batch, k, -1)
        _write_cells(z, chunk, features, grid.n)
    return z


def patchgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: PatchSource,
    labels: torch.Tensor,
    cfg: PatchGDConfig,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    max_inner_iterations: int | None = None,
) -> StepStats:
    """One PatchGD outer step on a mini-batch (the caller chooses train or eval mode).

    1. Fill: encode every patch once without gradients (chunks of k, random order) into Z.
    2. Inner iterations: re-encode k patches WITH gradients, write them into a detached Z, run
       the head on the whole Z, backpropagate; step the optimizer every ``eps`` iterations.

    ``max_inner_iterations`` stops early (memory measurement: the peak is reached on the first
    inner iteration). ``scheduler`` advances once per outer step.
    """
    started = time.perf_counter()
    device = _model_device(model)
    grid = source.grid
    batch, k = source.batch_size, cfg.k
    iterations = cfg.num_inner_iterations
    eps = cfg.num_accumulation_steps
    if max_inner_iterations is not None:
        iterations = min(iterations, max_inner_iterations)
    channels_last = cfg.use_channels_last(device.type)
    labels = labels.to(device)
    autocast = autocast_context(cfg, device)

    with torch.no_grad(), autocast:
        order = _patch_order(grid.num_patches, batch, cfg.per_image_positions, generator)
        z = fill_latent(model, source, _chunks(order, k), device=device, channels_last=channels_last)
    encoded = batch * grid.num_patches

    optimizer.zero_grad(set_to_none=True)
    losses: list[float] = []
    optimizer_steps = 0
    chunks = _inner_chunks(grid.num_patches, k, iterations, batch, cfg.per_image_positions, generator)
    for j, chunk in enumerate(chunks):
        window_start = (j // eps) * eps
        window = min(eps, cfg.num_inner_iterations - window_start)
        # Earlier writes become constants: only this iteration's k cells carry gradient.
        z = z.detach()
        with autocast:
            patches = source.patches(chunk)
            features = model.encode(_prepare(patches, device, channels_last)).reshape(batch, chunk.shape[-1], -1)
            if window > 1:
                # Weights are frozen inside an accumulation window, so the window's summed
                # gradient is the full-image gradient taken chunk by chunk. The head sees every
                # one of the `window` losses (each divided by `window`: their sum is exact), but
                # each patch cell is written with gradient only once, so its 1/window share
                # would leave the backbone `window` times too small. Scaling the gradient that
                # flows into these new features by `window` makes the backbone exact too; the
                # forward values are untouched. With window = 1 (stale-Z regime) nothing changes.
                features.register_hook(lambda grad, scale=float(window): grad * scale)
            # Never detach `features`: that would cut every gradient to the backbone.
            _write_cells(z, chunk, features, grid.n)
            logits = model.classify(z)
        loss = F.cross_entropy(_at_least_fp32(logits), labels)
        (loss / window).backward()
        losses.append(loss.item())
        encoded += batch * chunk.shape[-1]
        if j + 1 == window_start + window:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
    if scheduler is not None:
        scheduler.step()
    return StepStats(
        loss=sum(losses) / len(losses),
        num_images=batch,
        num_patches_encoded=encoded,
        optimizer_steps=optimizer_steps,
        seconds=time.perf_counter() - started,
    )


def baseline_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: BaselineConfig,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> StepStats:
    """One ordinary full-image training step (forward, backward, optimizer step)."""
    started = time.perf_counter()
    device = _model_device(model)
    images = images.to(device, non_blocking=True)
    if cfg.use_channels_last(device.type):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device)
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(cfg, device):
        logits = model(images)
    loss = F.cross_entropy(_at_least_fp32(logits), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepStats(
        loss=loss.item(),
        num_images=images.shape[0],
        num_patches_encoded=0,
        optimizer_steps=1,
        seconds=time.perf_counter() - started,
    )
