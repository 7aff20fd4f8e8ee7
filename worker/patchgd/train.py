"""PatchGD and baseline training: one-step functions and the shared epoch loop.

The step functions are the whole algorithm; ``train`` is bookkeeping around them (seeding,
schedules, progress, evaluation, checkpoints, cancellation). Read ``patchgd_step`` first.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import frozen_running_stats, one_update_per_step
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import BaselineConfig, PatchGDConfig
from .grid import PatchSource, TensorPatchSource, as_batch
from .infer import predict_logits
from .metrics import classification_report
from .models import build_baseline_model, build_patchgd_model


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


def autocast_context(
    cfg: PatchGDConfig | BaselineConfig, device: torch.device
) -> contextlib.AbstractContextManager:
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

    With the default full-sweep accumulation the summed gradient equals the full-image gradient
    of the patch-decomposed model (tests/engine/test_gradients.py). That holds for any per-patch
    function; in train mode BatchNorm normalises each chunk with its own batch statistics and
    dropout draws new masks, exactly as in the reference, so there the "full image" is the sum
    over those per-chunk functions.
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

    # BatchNorm running statistics move once per outer step, as in one ordinary step: the
    # backbone's from the fill pass (every patch once, averaged over its chunks), the head's from
    # the inner iterations (averaged); the backbone's gradient passes leave them alone. See
    # batchnorm.py for why updating on every chunk of both passes ruins evaluation.
    with torch.no_grad(), autocast, one_update_per_step(model.backbone):
        order = _patch_order(grid.num_patches, batch, cfg.per_image_positions, generator)
        z = model.fill_latent(source, _chunks(order, k), channels_last=channels_last)
    encoded = batch * grid.num_patches

    optimizer.zero_grad(set_to_none=True)
    # Summed on the device and read once at the end: a .item() per inner iteration would stall
    # the GPU queue k times per step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    optimizer_steps = 0
    chunks = _inner_chunks(grid.num_patches, k, iterations, batch, cfg.per_image_positions, generator)
    with frozen_running_stats(model.backbone), one_update_per_step(model.head):
        for j, chunk in enumerate(chunks):
            window_start = (j // eps) * eps
            window = min(eps, cfg.num_inner_iterations - window_start)
            # Earlier writes become constants: only this iteration's k cells carry gradient.
            z = z.detach()
            with autocast:
                patches = source.patches(chunk)
                features = model.encode(as_batch(patches, device, channels_last)).reshape(
                    batch, chunk.shape[-1], -1
                )
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
                grid.scatter(z, chunk, features)
                logits = model.classify(z)
            loss = F.cross_entropy(_at_least_fp32(logits), labels)
            (loss / window).backward()
            loss_sum += loss.detach()
            encoded += batch * chunk.shape[-1]
            if j + 1 == window_start + window:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_steps += 1
    if scheduler is not None:
        scheduler.step()
    return StepStats(
        loss=loss_sum.item() / max(1, iterations),
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


@dataclass
class Progress:
    """A snapshot sent to ``on_progress`` after every step."""

    epoch: int
    step: int
    total_steps: int
    fraction: float
    images_per_s: float
    patches_per_s: float
    eta_seconds: float
    loss: float
    lr: float
    peak_memory_bytes: int


@dataclass
class EpochMetrics:
    """Per-epoch results sent to ``on_epoch_end`` and kept in the run history."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    val_qwk: float | None
    val_report: dict | None
    lr: float
    images_per_s: float
    patches_per_s: float
    peak_memory_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """How a run ended and what it produced.

    ``status``: "succeeded" (all epochs), "cancelled" (``should_stop`` returned True) or
    "stopped" (``max_steps`` reached). ``final`` is the evaluation of the final model on the
    held-out loader (not the best epoch), or None without one.
    """

    status: str
    model: nn.Module
    epochs_completed: int
    steps: int
    history: list[EpochMetrics] = field(default_factory=list)
    final: dict | None = None
    checkpoint_path: Path | None = None
    seconds: float = 0.0


CHECKPOINT_NAME = "last.pt"


def seed_everything(seed: int) -> None:
    """Seed every global RNG a run touches (torch incl. CUDA, numpy, Python)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated bytes on a GPU; the process resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def evaluate(
    model: nn.Module, loader: Iterable, cfg: PatchGDConfig | BaselineConfig, device: torch.device
) -> dict[str, Any]:
    """Loss and classification report of ``model`` over a loader, in eval mode (no gradients)."""
    dtype = torch.bfloat16 if cfg.use_bf16(device.type) else None
    total_loss, count = 0.0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    for images, labels in loader:
        logits = predict_logits(model, images, device=device, autocast_dtype=dtype)
        total_loss += F.cross_entropy(logits, labels.cpu(), reduction="sum").item()
        count += labels.shape[0]
        y_true += labels.tolist()
        y_pred += logits.argmax(dim=1).tolist()
    report = classification_report(y_true, y_pred, cfg.num_classes)
    report["loss"] = total_loss / count if count else None
    return report


def _check_resumable(state: dict[str, Any], cfg: PatchGDConfig | BaselineConfig) -> None:
    if state.get("algorithm") != cfg.algorithm:
        raise CheckpointError(f"the checkpoint is for {state.get('algorithm')}, this run is {cfg.algorithm}")
    saved, current = state.get("config", {}), cfg.to_dict()
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise CheckpointError(
            f"the checkpoint was written with different hyperparameters: {', '.join(changed)}"
        )


def train(
    cfg: PatchGDConfig | BaselineConfig,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    device: torch.device | str,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch_end: Callable[[EpochMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train PatchGD or the baseline (by config type) and evaluate the final model.

    ``train_loader`` yields ``(images [B, C, S, S] normalised float32, labels [B])``; for PatchGD
    the images may also be any ``PatchSource`` (e.g. a streaming one). A ``torch.Generator``
    attached to the loader (``DataLoader(generator=...)``) is seeded from ``cfg.seed`` and
    checkpointed, so shuffling resumes exactly. A full-state checkpoint is written atomically to
    ``checkpoint_dir/last.pt`` after every epoch; ``resume_from`` continues from one as if the run
    had never stopped. ``should_stop`` is checked before every step (cancellation);
    ``max_steps`` ends the run after that many steps in total.

    Resume is bit-exact on CPU (tests/engine/test_resume.py); on CUDA it is exact up to the
    nondeterministic cuDNN kernels, which we keep for speed.
    """
    started = time.perf_counter()
    device = torch.device(device)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("the training set is empty")
    is_patchgd = isinstance(cfg, PatchGDConfig)

    seed_everything(cfg.seed)
    # A resumed run takes every weight from the checkpoint: the pretrained file is not needed again.
    fresh = resume_from is None
    builder = build_patchgd_model if is_patchgd else build_baseline_model
    model = builder(cfg, load_pretrained=fresh).to(device)  # type: ignore[arg-type]
    if cfg.use_channels_last(device.type):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    # Patch positions get their own generator so that data loading (which may draw from the
    # global RNG) never changes which patches a step samples.
    sampler = torch.Generator().manual_seed(cfg.seed)
    loader_generator = getattr(train_loader, "generator", None)
    if isinstance(loader_generator, torch.Generator):
        loader_generator.manual_seed(cfg.seed)

    start_epoch, step = 0, 0
    history: list[EpochMetrics] = []
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_resumable(state, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        sampler.set_state(state["sampler_rng"])
        if isinstance(loader_generator, torch.Generator) and state.get("loader_rng") is not None:
            loader_generator.set_state(state["loader_rng"])
        start_epoch, step = state["epoch"], state["step"]
        history = [EpochMetrics(**item) for item in state["history"]]

    total_steps = cfg.epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_images = run_patches = run_steps = 0
    run_step_seconds = 0.0
    status = "succeeded"

    for epoch in range(start_epoch, cfg.epochs):
        if max_steps is not None and step >= max_steps:
            status = "stopped"
            break
        model.train()
        epoch_started = time.perf_counter()
        epoch_losses: list[float] = []
        batches_done = 0
        for images, labels in train_loader:
            if should_stop is not None and should_stop():
                status = "cancelled"
                break
            # Checked here, after the loader handed out the next batch, rather than right after
            # a step: leaving an epoch's iterator before it is exhausted skips the shuffler's
            # final RNG draw and a resumed run would then see a different data order.
            if max_steps is not None and step >= max_steps:
                status = "stopped"
                break
            if is_patchgd:
                source = (
                    images
                    if isinstance(images, PatchSource)
                    else TensorPatchSource(images.to(device), cfg.grid)
                )
                stats = patchgd_step(
                    model, optimizer, source, labels, cfg, scheduler=scheduler, generator=sampler
                )
            else:
                stats = baseline_step(model, optimizer, images, labels, cfg, scheduler=scheduler)
            step += 1
            run_steps += 1
            batches_done += 1
            epoch_losses.append(stats.loss)
            run_images += stats.num_images
            run_patches += stats.num_patches_encoded
            run_step_seconds += stats.seconds
            if on_progress is not None:
                per_step = run_step_seconds / run_steps
                on_progress(
                    Progress(
                        epoch=epoch,
                        step=step,
                        total_steps=total_steps,
                        fraction=min(1.0, step / total_steps),
                        images_per_s=run_images / run_step_seconds if run_step_seconds else 0.0,
                        patches_per_s=run_patches / run_step_seconds if run_step_seconds else 0.0,
                        eta_seconds=max(0, total_steps - step) * per_step,
                        loss=stats.loss,
                        lr=optimizer.param_groups[0]["lr"],
                        peak_memory_bytes=peak_memory_bytes(device),
                    )
                )
        if batches_done < steps_per_epoch:
            # Cancelled or stopped mid-epoch: no evaluation, no checkpoint of a partial epoch.
            if status == "succeeded":
                status = "stopped"
            break

        val = evaluate(model, val_loader, cfg, device) if val_loader is not None else None
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=sum(epoch_losses) / len(epoch_losses),
            val_loss=val["loss"] if val else None,
            val_accuracy=val["accuracy"] if val else None,
            val_qwk=val["qwk"] if val else None,
            val_report=val,
            lr=optimizer.param_groups[0]["lr"],
            images_per_s=run_images / run_step_seconds if run_step_seconds else 0.0,
            patches_per_s=run_patches / run_step_seconds if run_step_seconds else 0.0,
            peak_memory_bytes=peak_memory_bytes(device),
            seconds=time.perf_counter() - epoch_started,
        )
        history.append(metrics)
        if checkpoint_path is not None:
            # Written after evaluation so the saved RNG state is exactly where the next epoch
            # starts (iterating a loader draws from the global RNG).
            save_checkpoint(
                {
                    "algorithm": cfg.algorithm,
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "sampler_rng": sampler.get_state(),
                    "loader_rng": loader_generator.get_state()
                    if isinstance(loader_generator, torch.Generator)
                    else None,
                    "epoch": epoch + 1,
                    "step": step,
                    "history": [item.to_dict() for item in history],
                },
                checkpoint_path,
            )
        if on_epoch_end is not None:
            on_epoch_end(metrics)
        if status != "succeeded":
            break

    epochs_completed = len(history)
    if status == "stopped" and epochs_completed == cfg.epochs:
        status = "succeeded"
    final = history[-1].val_report if history and epochs_completed == cfg.epochs else None
    return TrainResult(
        status=status,
        model=model,
        epochs_completed=epochs_completed,
        steps=step,
        history=history,
        final=final,
        checkpoint_path=checkpoint_path if checkpoint_path is not None and checkpoint_path.exists() else None,
        seconds=time.perf_counter() - started,
    )
