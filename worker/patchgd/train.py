"""PatchGD and baseline training: one-step functions and the shared epoch loop.

The step functions are the whole algorithm; ``train`` is bookkeeping around them (seeding,
schedules, progress, evaluation, checkpoints, cancellation). Read ``patchgd_step`` first.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
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
from torch.utils.data.dataloader import _DatasetKind

from .batchnorm import batchnorm_layers, frozen_running_stats, one_update_per_step
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import BaselineConfig, PatchGDConfig
from .errors import DatasetError
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
    coverage: torch.Tensor | None = None,
) -> StepStats:
    """One PatchGD outer step on a mini-batch (the caller chooses train or eval mode).

    1. Fill: encode every patch once without gradients (chunks of k, random order) into Z.
    2. Inner iterations: re-encode k patches WITH gradients, write them into a detached Z, run
       the head on the whole Z, backpropagate; step the optimizer every ``eps`` iterations.

    ``max_inner_iterations`` stops early (memory measurement: the peak is reached on the first
    inner iteration). ``scheduler`` advances once per outer step. ``coverage`` (int64,
    ``[num_patches]``), when given, counts every patch re-encoded with gradient at its grid cell:
    it grows by ``batch * k`` per inner iteration (the fill pass is not counted).

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
            if coverage is not None:
                cells = chunk.reshape(-1).to(coverage.device)
                weight = 1 if chunk.dim() > 1 else batch  # a shared chunk is sampled in every image
                coverage.index_add_(0, cells, torch.full_like(cells, weight))
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
    """A snapshot sent to ``on_progress`` after every training step and every evaluation batch.

    ``lrs`` is the learning rate of each parameter group by name ("backbone" and "head" for
    PatchGD, "model" for the baseline); ``lr`` is the first group's, kept for older readers.
    ``phase`` is "train" or "eval"; ``phase_done`` of ``phase_total`` batches of this epoch's
    phase are finished (``phase_total`` 0: unknown length). During "eval" the step counters,
    fraction and ETA stay those of training, ``loss`` is the running validation loss and the
    throughputs are the evaluation's.
    """

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
    lrs: dict[str, float] = field(default_factory=dict)
    phase: str = "train"
    phase_done: int = 0
    phase_total: int = 0
    #: PatchGD: gradient passes per grid cell since the run began (resumes included), row-major
    #: n×n; summed, the number of patches sampled. None for the baseline.
    patch_coverage: list[int] | None = None


@dataclass
class EpochMetrics:
    """Per-epoch results sent to ``on_epoch_end`` and kept in the run history (``lrs``: as in Progress)."""

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
    lrs: dict[str, float] = field(default_factory=dict)

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
    #: PatchGD: the run's patch coverage at the end (as in :class:`Progress`); None for the baseline.
    patch_coverage: list[int] | None = None


CHECKPOINT_NAME = "last.pt"
# The checkpoint that ``last.pt`` replaced: the fallback when the newest one is unreadable.
PREVIOUS_CHECKPOINT_NAME = "previous.pt"
# Config fields that only steer bookkeeping, never the arithmetic: a resumed run may change them.
OPERATIONAL_FIELDS = frozenset({"checkpoint_every_minutes"})


def seed_everything(seed: int) -> None:
    """Seed every global RNG a run touches (torch incl. CUDA, numpy, Python)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; True when the peak really restarts from now.

    CUDA: the allocator's peak statistics. CPU (Linux): writing "5" to /proc/self/clear_refs
    resets the kernel's resident-set high-water mark (VmHWM) of this process. Where that file
    cannot be written the CPU peak stays the process-lifetime one (still a peak, never less).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last ``reset_peak_memory``: allocated bytes on CUDA, resident set on CPU.

    On CPU the kernel's high-water mark (VmHWM on Linux, else ``ru_maxrss``), which catches
    allocations freed again before anyone looked, unlike a reading of the current RSS.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports kilobytes, macOS bytes.
        return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
    except ImportError:
        return int(psutil.Process().memory_info().rss)


def _length(loader: Iterable) -> int:
    """Batches in a loader, 0 when it cannot tell (an iterable dataset, a generator)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 0


def recalibration_batches(train_loader: Iterable, count: int) -> Iterable | None:
    """The first ``count`` training batches in dataset order, drawn without touching any RNG that
    training uses (so the next epoch's order and a resumed run are unchanged); None when the
    loader's data cannot be read that way (an iterable-style dataset)."""
    if count <= 0:
        return None
    if isinstance(train_loader, (list, tuple)):
        return train_loader[:count]
    dataset = getattr(train_loader, "dataset", None)
    batch_size = getattr(train_loader, "batch_size", None)
    if (
        dataset is None
        or not batch_size
        or isinstance(dataset, torch.utils.data.IterableDataset)
        or not hasattr(dataset, "__len__")
    ):
        return None
    indices = range(min(len(dataset), count * batch_size))
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        collate_fn=train_loader.collate_fn,  # type: ignore[attr-defined]
        generator=torch.Generator(),  # its seed draw leaves the global RNG alone
    )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable, cfg: PatchGDConfig | BaselineConfig, device: torch.device
) -> int:
    """Re-estimate every BatchNorm layer's running statistics for the current weights ("precise
    BatchNorm"): forget them, then run ``batches`` as training does (train-mode normalisation,
    PatchGD's fill pass in chunks of k, then the head on Z) with a cumulative average, no
    gradients, dropout off, and the random number generators restored afterwards. Running
    statistics updated once per step with momentum 0.1 follow the weights over about ten steps; at
    a high learning rate evaluation would see another network. Returns the number of batches used
    (0: nothing run, the statistics are kept as they were)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in model.modules():  # each layer sees what it sees in evaluation: no dropout
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    used = 0
    devices = [device] if device.type == "cuda" else []
    try:
        # No random number that training draws from moves (the next epoch is unchanged).
        with torch.random.fork_rng(devices=devices), autocast_context(cfg, device):
            for images, _labels in batches:
                if isinstance(cfg, PatchGDConfig):
                    source = (
                        images
                        if isinstance(images, PatchSource)
                        else TensorPatchSource(images.to(device), cfg.grid)
                    )
                    order = torch.arange(cfg.grid.num_patches)
                    z = model.fill_latent(  # type: ignore[operator]
                        source, _chunks(order, cfg.k), channels_last=cfg.use_channels_last(device.type)
                    )
                    model.classify(z)  # type: ignore[operator]
                    _close(source)
                else:
                    x = images.to(device)
                    if cfg.use_channels_last(device.type):
                        x = x.contiguous(memory_format=torch.channels_last)
                    model(x)
                used += 1
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if not used:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.train(was_training)
    return used


def _close(source: object) -> None:
    """Close the files of a streamed batch once it has been used (in-memory batches have none)."""
    close = getattr(source, "close", None)
    if callable(close):
        close()


def evaluate(
    model: nn.Module,
    loader: Iterable,
    cfg: PatchGDConfig | BaselineConfig,
    device: torch.device,
    *,
    on_batch: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Loss and classification report of ``model`` over a loader, in eval mode (no gradients).

    ``on_batch(batches_done, images_done, mean_loss_so_far)`` is called after every batch (a
    heartbeat for long evaluations); ``should_stop`` is checked before every batch and, when it
    returns True, the evaluation is abandoned and None returned.
    """
    dtype = torch.bfloat16 if cfg.use_bf16(device.type) else None
    total_loss, count = 0.0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    for batches, (images, labels) in enumerate(loader, start=1):
        if should_stop is not None and should_stop():
            return None
        logits = predict_logits(model, images, device=device, autocast_dtype=dtype)
        _close(images)
        total_loss += F.cross_entropy(logits, labels.cpu(), reduction="sum").item()
        count += labels.shape[0]
        y_true += labels.tolist()
        y_pred += logits.argmax(dim=1).tolist()
        if on_batch is not None:
            on_batch(batches, count, total_loss / count)
    report = classification_report(y_true, y_pred, cfg.num_classes)
    report["loss"] = total_loss / count if count else None
    return report


def _eval_heartbeat(
    on_progress: Callable[[Progress], None],
    total_batches: int,
    patches_per_image: int,
    *,
    device: torch.device,
    **fixed: Any,
) -> Callable[[int, int, float], None]:
    """An ``evaluate`` callback that reports "eval" Progress (training counters held in ``fixed``)."""
    started = time.perf_counter()

    def report(batches: int, images: int, loss: float) -> None:
        elapsed = time.perf_counter() - started
        images_per_s = images / elapsed if elapsed else 0.0
        on_progress(
            Progress(
                **fixed,
                images_per_s=images_per_s,
                patches_per_s=images_per_s * patches_per_image,
                loss=loss,
                peak_memory_bytes=peak_memory_bytes(device),
                phase="eval",
                phase_done=batches,
                phase_total=total_batches,
            )
        )

    return report


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of every parameter group, by group name."""
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def _check_resumable(state: dict[str, Any], cfg: PatchGDConfig | BaselineConfig) -> None:
    """Refuse a checkpoint of another algorithm or with other hyperparameters, naming them.

    Only ``epochs`` may grow (extending a run, finished or not) and the operational fields may
    change; everything else would make the continued run something no single run could produce.
    """
    if state.get("algorithm") != cfg.algorithm:
        raise CheckpointError(f"the checkpoint is for {state.get('algorithm')}, this run is {cfg.algorithm}")
    saved, current = state.get("config", {}), cfg.to_dict()
    may_change = OPERATIONAL_FIELDS | {"epochs"}
    changed = sorted(
        k for k in set(saved) | set(current) if k not in may_change and saved.get(k) != current.get(k)
    )
    if changed:
        raise CheckpointError(
            f"the checkpoint was written with different hyperparameters: {', '.join(changed)}"
        )
    saved_epochs = saved.get("epochs")
    if isinstance(saved_epochs, int) and cfg.epochs < saved_epochs:
        raise CheckpointError(
            f"epochs can only be extended on resume: the checkpoint's run has {saved_epochs}, "
            f"this one {cfg.epochs}"
        )


def _follow_new_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """Set every group's learning rate to this run's schedule at the restored step.

    Needed when ``epochs`` was extended: the checkpoint holds the rate of the shorter schedule.
    """
    for group, base_lr, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # type: ignore[attr-defined]


def _write_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Save ``state`` as ``directory/last.pt``, keeping the file it replaces as ``previous.pt``."""
    path = directory / CHECKPOINT_NAME
    if path.exists():
        os.replace(path, directory / PREVIOUS_CHECKPOINT_NAME)
    return save_checkpoint(state, path)


def _skip_batches(iterator: Iterator, count: int) -> None:
    """Advance a fresh epoch iterator past ``count`` batches (a resume from mid-epoch).

    A single-process ``DataLoader`` only draws the batch indices (the same sampler draws as the
    original run) without loading the images; any other iterable is read and the batches dropped.
    Exactness needs the iterable to be a function of the RNG states at the epoch's start: true
    for DataLoaders (worker seeds are drawn when the iterator is made) except random transforms
    inside ``persistent_workers``, whose RNGs carry over from earlier epochs.
    """
    next_index = getattr(iterator, "_next_index", None)
    map_style = getattr(iterator, "_dataset_kind", None) == _DatasetKind.Map  # not an IterableDataset
    if callable(next_index) and map_style and getattr(iterator, "_num_workers", None) == 0:
        for _ in range(count):
            next_index()
        iterator._num_yielded += count  # type: ignore[attr-defined]
        return
    for _ in range(count):
        next(iterator)


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
    clock: Callable[[], float] = time.monotonic,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train PatchGD or the baseline (by config type) and evaluate the final model.

    ``train_loader`` yields ``(images [B, C, S, S] normalised float32, labels [B])``; for PatchGD
    the images may also be any ``PatchSource`` (e.g. the ``StackedPatchSource`` batches of streamed
    files from ``make_loaders(..., streaming=...)``, closed after their step). A ``torch.Generator``
    attached to the loader (``DataLoader(generator=...)``) is seeded from ``cfg.seed`` and
    checkpointed, so shuffling resumes exactly. A full-state checkpoint is written atomically to
    ``checkpoint_dir/last.pt`` after every epoch, and also between steps once
    ``cfg.checkpoint_every_minutes`` have passed (by ``clock``, in seconds) since the last one;
    the file it replaces is kept as ``previous.pt``. ``resume_from`` continues from one as if the
    run had never stopped, mid-epoch included; ``resume_from="auto"`` takes the newest readable
    checkpoint in ``checkpoint_dir`` (a damaged one is skipped with a warning) or starts afresh
    when there is none. ``should_stop`` is checked before every step
    (cancellation); ``max_steps`` ends the run after that many steps in total.

    A mid-epoch checkpoint records the epoch, the number of batches done, the losses so far and
    two sets of RNG states: those at the start of the epoch (global and loader generator, which
    decide the epoch's data order) and those at the checkpoint. Resuming restores the first,
    opens the epoch's iterator and skips the finished batches (so the order is the same), then
    restores the second and carries on.

    A finished (or unfinished) run is extended by resuming it with a larger ``epochs``; every
    other hyperparameter must match. The learning-rate schedule is the one the new ``epochs``
    defines, applied from the restored step on: warmup (already past) is unchanged and the linear
    decay is stretched to reach zero at the new end, so a finished run (rate 0) picks up at the
    rate the longer schedule has at that step, exactly as if it had been planned with the new
    ``epochs`` from there on. Earlier steps keep the rates they were trained with.

    Resume is bit-exact on CPU (tests/engine/test_resume.py); on CUDA it is exact up to the
    nondeterministic cuDNN kernels, which we keep for speed.

    PatchGD counts how often each grid cell was sampled for a gradient pass (``patch_coverage``
    on every :class:`Progress` and on the result); the counts are checkpointed, so a resumed run
    carries on from exactly the counts of an uninterrupted one. ``on_event(kind, info)`` hears
    ``"resumed"`` (``epoch``, ``batch``, ``step``, ``path``) once after a checkpoint was loaded,
    and ``"checkpoint"`` (``epoch``, ``batch``, ``step``, ``path``, ``reason``: "epoch" or
    "timed") after each checkpoint written.
    """
    started = time.perf_counter()
    device = torch.device(device)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise DatasetError("the training set is empty")
    is_patchgd = isinstance(cfg, PatchGDConfig)
    state: dict[str, Any] = {}
    if resume_from == "auto":
        if checkpoint_dir is None:
            raise ValueError('resume_from="auto" needs a checkpoint_dir to look in')
        found = find_latest_checkpoint(checkpoint_dir)
        resume_from, state = found if found is not None else (None, {})
    elif resume_from is not None:
        state = load_checkpoint(resume_from)

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
    coverage = torch.zeros(cfg.grid.num_patches, dtype=torch.int64) if is_patchgd else None  # type: ignore[union-attr]
    if resume_from is not None:
        _check_resumable(state, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["config"].get("epochs") != cfg.epochs:
            _follow_new_schedule(optimizer, scheduler)
        restore_rng_state(state["rng"])
        sampler.set_state(state["sampler_rng"])
        if isinstance(loader_generator, torch.Generator) and state.get("loader_rng") is not None:
            loader_generator.set_state(state["loader_rng"])
        start_epoch, step = state["epoch"], state["step"]
        history = [EpochMetrics(**item) for item in state["history"]]
        saved_coverage = state.get("coverage")
        if coverage is not None and isinstance(saved_coverage, torch.Tensor):
            if saved_coverage.shape != coverage.shape:
                raise CheckpointError("the checkpoint's patch coverage does not match the patch grid")
            coverage.copy_(saved_coverage)
    resume_batch = int(state.get("batch", 0))
    if resume_from is not None and on_event is not None:
        on_event(
            "resumed", {"epoch": start_epoch, "batch": resume_batch, "step": step, "path": str(resume_from)}
        )

    def coverage_list() -> list[int] | None:
        return coverage.tolist() if coverage is not None else None

    has_loader_generator = isinstance(loader_generator, torch.Generator)

    def loader_state() -> torch.Tensor | None:
        return loader_generator.get_state() if has_loader_generator else None  # type: ignore[union-attr]

    total_steps = cfg.epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    interval_s = (
        cfg.checkpoint_every_minutes * 60.0
        if checkpoint_path is not None and cfg.checkpoint_every_minutes is not None
        else None
    )
    last_saved = clock()
    run_images = run_patches = run_steps = 0
    run_step_seconds = 0.0
    status = "succeeded"

    for epoch in range(start_epoch, cfg.epochs):
        if max_steps is not None and step >= max_steps:
            status = "stopped"
            break
        model.train()
        epoch_started = time.perf_counter()
        # Progress and EpochMetrics report the peak of the epoch so far.
        reset_peak_memory(device)
        epoch_losses: list[float] = []
        batches_done = 0
        skip = resume_batch if epoch == start_epoch else 0
        if skip:
            # Back to the epoch's start so the iterator draws the same order, then forward again.
            epoch_rng, epoch_loader_rng = state["epoch_rng"], state["epoch_loader_rng"]
            restore_rng_state(epoch_rng)
            if has_loader_generator and epoch_loader_rng is not None:
                loader_generator.set_state(epoch_loader_rng)  # type: ignore[union-attr]
        else:
            epoch_rng, epoch_loader_rng = capture_rng_state(), loader_state()
        batches = iter(train_loader)
        if skip:
            _skip_batches(batches, skip)
            restore_rng_state(state["rng"])
            if has_loader_generator and state.get("loader_rng") is not None:
                loader_generator.set_state(state["loader_rng"])  # type: ignore[union-attr]
            batches_done = skip
            epoch_losses = list(state["epoch_losses"])
        for images, labels in batches:
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
                    model,
                    optimizer,
                    source,
                    labels,
                    cfg,
                    scheduler=scheduler,
                    generator=sampler,
                    coverage=coverage,
                )
                _close(source)
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
                        lrs=group_lrs(optimizer),
                        phase_done=batches_done,
                        phase_total=steps_per_epoch,
                        patch_coverage=coverage_list(),
                    )
                )
            due = interval_s is not None and clock() - last_saved >= interval_s
            # Not after an epoch's last batch: the epoch-end checkpoint follows the evaluation.
            if due and batches_done < steps_per_epoch:
                _write_checkpoint(
                    {
                        "algorithm": cfg.algorithm,
                        "config": cfg.to_dict(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": capture_rng_state(),
                        "sampler_rng": sampler.get_state(),
                        "loader_rng": loader_state(),
                        "epoch": epoch,
                        "batch": batches_done,
                        "step": step,
                        "epoch_rng": epoch_rng,
                        "epoch_loader_rng": epoch_loader_rng,
                        "epoch_losses": list(epoch_losses),
                        "history": [item.to_dict() for item in history],
                        "coverage": coverage.clone() if coverage is not None else None,
                    },
                    checkpoint_path.parent,  # type: ignore[union-attr]
                )
                last_saved = clock()
                if on_event is not None:
                    on_event(
                        "checkpoint",
                        {
                            "epoch": epoch,
                            "batch": batches_done,
                            "step": step,
                            "path": str(checkpoint_path),
                            "reason": "timed",
                        },
                    )
        if batches_done < steps_per_epoch:
            # Cancelled or stopped mid-epoch: no evaluation and no epoch-end checkpoint (the last
            # time-based one, if any, stays the newest).
            if status == "succeeded":
                status = "stopped"
            break

        recalibration = recalibration_batches(train_loader, cfg.bn_recalibration_batches)
        if recalibration is not None:
            recalibrate_batchnorm(model, recalibration, cfg, device)
        val = None
        if val_loader is not None:
            heartbeat = None
            if on_progress is not None:
                heartbeat = _eval_heartbeat(
                    on_progress,
                    _length(val_loader),
                    cfg.grid.num_patches if is_patchgd else 0,  # type: ignore[union-attr]
                    epoch=epoch,
                    step=step,
                    total_steps=total_steps,
                    fraction=min(1.0, step / total_steps),
                    eta_seconds=max(0, total_steps - step) * run_step_seconds / max(1, run_steps),
                    lr=optimizer.param_groups[0]["lr"],
                    lrs=group_lrs(optimizer),
                    device=device,
                    patch_coverage=coverage_list(),
                )
            val = evaluate(
                model,
                val_loader,
                cfg,
                device,
                on_batch=heartbeat,
                should_stop=should_stop,
            )
            if val is None:
                # Cancelled during evaluation: the epoch is not recorded and no epoch-end
                # checkpoint is written (a resume repeats it from the last checkpoint).
                status = "cancelled"
                break
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
            lrs=group_lrs(optimizer),
        )
        history.append(metrics)
        if checkpoint_path is not None:
            # Written after evaluation so the saved RNG state is exactly where the next epoch
            # starts (iterating a loader draws from the global RNG).
            _write_checkpoint(
                {
                    "algorithm": cfg.algorithm,
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "sampler_rng": sampler.get_state(),
                    "loader_rng": loader_state(),
                    "epoch": epoch + 1,
                    "batch": 0,
                    "step": step,
                    "history": [item.to_dict() for item in history],
                    "coverage": coverage.clone() if coverage is not None else None,
                },
                checkpoint_path.parent,
            )
            last_saved = clock()
            if on_event is not None:
                on_event(
                    "checkpoint",
                    {
                        "epoch": epoch + 1,
                        "batch": 0,
                        "step": step,
                        "path": str(checkpoint_path),
                        "reason": "epoch",
                    },
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
        patch_coverage=coverage_list(),
    )
