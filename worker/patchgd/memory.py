"""Peak-memory measurement, an analytic memory model, and the memory-budget planner.

Measurement runs a workload and reports its peak: on CPU in a child interpreter (resident set
size sampled every few ms, with ``ru_maxrss`` as a floor) so an out-of-memory workload cannot take
the caller down, started with `subprocess` so it also works inside Celery's daemonic pool
workers; on CUDA with the allocator's peak statistics. The analytic model predicts the peak of
a PatchGD or baseline training step from parameter counts and a per-backbone activation cost
calibrated by measurement. The planner picks batch size and k (PatchGD) or batch size and
resolution (baseline) from the model, then verifies the choice with a short measured trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import itertools
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from .config import BaselineConfig, PatchGDConfig
from .data import StreamingPatchSource, open_region_reader
from .errors import ConfigError
from .grid import TensorPatchSource
from .models import build_backbone, build_baseline_model, build_patchgd_model
from .train import baseline_step, build_optimizer, patchgd_step

GIB = 1 << 30
# Adam(W) keeps param + grad + exp_avg + exp_avg_sq, four fp32 tensors per parameter.
ADAM_BYTES_PER_PARAM = 16
# Every optimizer step of torch's (foreach) Adam makes one parameter-sized temporary
# (``_foreach_sqrt(exp_avg_sq)``). The allocator keeps what it frees for later tensors, so on CPU
# the process holds it through the step's forward and backward too: measured trials of
# ResNet18/50 peaked 4-4.5 bytes per parameter above parameters, gradients and moments. For the
# backbone this is measured, inside the calibrated overhead (the calibration runs hold AdamW
# state made by a real step); for the PatchGD head, which the calibration does not build, the
# model adds this many bytes per parameter.
OPTIMIZER_WORKSPACE_BYTES_PER_PARAM = 4
FLOAT_BYTES = 4
# Predicted peaks are kept below this fraction of the budget: the model ignores allocator slack.
DEFAULT_SAFETY = 0.85
_OOM_MARKERS = (
    "out of memory",
    "can't allocate",
    "cannot allocate",
    "not enough memory",
    "defaultcpuallocator",
)


# --------------------------------------------------------------------------- measurement


@dataclass
class MemoryMeasurement:
    """Peak memory of one workload run, over the memory in use just before it started.

    ``status`` is ``ok``, ``out_of_memory`` (allocation failed, killed, or over ``limit_bytes``),
    ``error`` (the workload raised something else) or ``timeout``; ``fits`` is ``status == "ok"``.
    """

    device: str
    status: str
    peak_bytes: int | None
    baseline_bytes: int | None
    wall_s: float
    reason: str | None = None
    result: Any = None

    @property
    def fits(self) -> bool:
        """True when the workload ran to the end."""
        return self.status == "ok"

    @property
    def peak_gib(self) -> float | None:
        """Peak in GiB (None when nothing was measured)."""
        return None if self.peak_bytes is None else self.peak_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (the workload's result is left out)."""
        return {
            "device": self.device,
            "status": self.status,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "baseline_bytes": self.baseline_bytes,
            "wall_s": round(self.wall_s, 3),
            "reason": self.reason,
        }


class RssSampler:
    """Samples this process's resident set size in a background thread; `peak` is the maximum seen.

    Use as a context manager around the code to measure. Allocations shorter than the sampling
    interval can slip between samples, which is why `measure_peak` also consults ``ru_maxrss``.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        """Peak RSS minus the RSS when sampling started, in bytes."""
        return self.peak - self.baseline


def _resolve(fn_spec: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(fn_spec):
        return fn_spec
    module_name, _, attr = fn_spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"workload {fn_spec!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def _run_measured(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: str,
    interval_s: float,
    on_baseline: Callable[[int], None] | None = None,
) -> tuple[str, int | None, int | None, str | None, Any]:
    """Run `fn` and return (status, peak delta, baseline, reason, result) without raising."""
    try:
        if device.startswith("cuda"):
            # In-process on CUDA: an earlier trial's model and optimizer, if only a reference cycle
            # keeps them, would count in the baseline and be freed mid-run, hiding growth.
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            if on_baseline is not None:
                on_baseline(baseline)
            try:
                result = fn(*args, **kwargs)
                torch.cuda.synchronize(device)
            finally:
                peak = torch.cuda.max_memory_allocated(device) - baseline
            return "ok", peak, baseline, None, result
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler = RssSampler(interval_s)
        with sampler:
            if on_baseline is not None:
                on_baseline(sampler.baseline)
            result = fn(*args, **kwargs)
        peak = sampler.peak
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if ru_after > ru_before:
            # The lifetime maximum rose during the workload, so it is this workload's true peak,
            # including any spike shorter than the sampling interval.
            peak = max(peak, ru_after)
        return "ok", peak - sampler.baseline, sampler.baseline, None, result
    except BaseException as exc:  # noqa: BLE001 - a failed workload is a result, never a crash
        if isinstance(exc, KeyboardInterrupt):
            raise
        if _is_oom(exc):
            return "out_of_memory", None, None, f"{type(exc).__name__}: {exc}", None
        return "error", None, None, f"{type(exc).__name__}: {exc}", None
    finally:
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.empty_cache()


def _apply_limit(
    status: str, peak: int | None, reason: str | None, limit: int | None
) -> tuple[str, str | None]:
    """A finished workload whose peak went over `limit` counts as out of memory."""
    if status == "ok" and limit is not None and peak is not None and peak > limit:
        return "out_of_memory", f"peak {peak / GIB:.2f} GiB exceeds the limit {limit / GIB:.2f} GiB"
    return status, reason


def _workload_name(fn_spec: str | Callable[..., Any]) -> str:
    """``"package.module:function"`` for a workload given by name or as a module-level function."""
    if isinstance(fn_spec, str):
        return fn_spec
    module = getattr(fn_spec, "__module__", None)
    name = getattr(fn_spec, "__qualname__", "")
    if not module or module == "__main__" or not name.isidentifier():
        raise ValueError(
            f"{fn_spec!r} cannot run in a measuring child: give a module-level function of an "
            "importable module, or 'package.module:function'"
        )
    return f"{module}:{name}"


# The folder holding the ``worker`` package: the measuring child imports it from there whatever
# the caller's working directory.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """Kill the child if it still runs, and reap it."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    child.wait()


def _tail(stream: Any, limit: int = 2000) -> str:
    stream.seek(0)
    text = stream.read().decode("utf-8", errors="replace").strip()
    return text[-limit:]


def measure_peak(
    fn_spec: str | Callable[..., Any],
    *args: Any,
    device: str = "cpu",
    isolate: bool | None = None,
    limit_bytes: int | None = None,
    timeout_s: float | None = None,
    interval_s: float = 0.005,
    **kwargs: Any,
) -> MemoryMeasurement:
    """Run a workload and measure its peak memory over the memory in use before it started.

    `fn_spec` is ``"package.module:function"`` or a module-level function. On CPU it runs in a
    child interpreter (``isolate`` default): ``python -m worker.patchgd.measure_child``, started
    with `subprocess`, so measuring works inside daemonic processes such as Celery's prefork pool
    workers, where `multiprocessing` children are forbidden. Arguments and the result travel as
    JSON. The peak is the child's RSS growth over its baseline (interpreter + torch, reported in
    ``baseline_bytes``). On CUDA it runs in this process by default, using the allocator's peak
    statistics. The child is killed (and the result is ``out_of_memory``) if its RSS grows by more
    than `limit_bytes`, and killed (``timeout``) after `timeout_s`; the call never raises for a
    failing or killed workload.
    """
    isolate = not device.startswith("cuda") if isolate is None else isolate
    started = time.perf_counter()
    if not isolate:
        status, peak, baseline, reason, result = _run_measured(
            _resolve(fn_spec), args, kwargs, device, interval_s
        )
        status, reason = _apply_limit(status, peak, reason, limit_bytes)
        return MemoryMeasurement(
            device, status, peak, baseline, time.perf_counter() - started, reason, result
        )

    try:
        spec = json.dumps(
            {
                "fn": _workload_name(fn_spec),
                "args": list(args),
                "kwargs": kwargs,
                "device": device,
                "interval_s": interval_s,
                "parent_pid": os.getpid(),
            }
        )
    except TypeError as exc:
        raise ValueError(f"workload arguments must be JSON values for a measuring child: {exc}") from exc
    read_fd, write_fd = os.pipe()
    output = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the child is gone
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "worker.patchgd.measure_child", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            # Same process group as the caller: a signal to a stopping worker's group reaches it.
            env=_child_env(),
        )
    except BaseException:
        os.close(read_fd)
        output.close()
        raise
    finally:
        os.close(write_fd)
    baseline: int | None = None
    outcome: dict[str, Any] | None = None
    stopped_reason: str | None = None
    pending = b""
    try:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            child.stdin.write(spec.encode("utf-8"))
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
        watched = psutil.Process(child.pid)
        eof = False
        while outcome is None and not eof:
            ready, _, _ = select.select([read_fd], [], [], 0.02)
            if ready:
                chunk = os.read(read_fd, 1 << 16)
                eof = not chunk
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message["kind"] == "baseline":
                        baseline = int(message["bytes"])
                    else:
                        outcome = message
                continue
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                stopped_reason = f"timeout after {timeout_s:.0f} s"
                break
            # RSS says nothing about GPU memory: on CUDA the limit is checked on the reported peak.
            if limit_bytes is not None and baseline is not None and not device.startswith("cuda"):
                try:
                    rss = watched.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                if rss - baseline > limit_bytes:
                    stopped_reason = (
                        f"stopped: memory grew by {(rss - baseline) / GIB:.2f} GiB, over the limit of "
                        f"{limit_bytes / GIB:.2f} GiB"
                    )
                    break
        if outcome is not None or eof:
            # The child has reported (or closed its end): give it a moment to exit on its own.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
    finally:
        _stop_child(child)
        os.close(read_fd)
    log = _tail(output)
    output.close()
    wall = time.perf_counter() - started
    if outcome is not None:
        peak = outcome.get("peak")
        status, reason = _apply_limit(outcome["status"], peak, outcome.get("reason"), limit_bytes)
        base = outcome.get("baseline")
        base = base if base is not None else baseline
        return MemoryMeasurement(device, status, peak, base, wall, reason, outcome.get("result"))
    if stopped_reason is not None:
        status = "timeout" if stopped_reason.startswith("timeout") else "out_of_memory"
        return MemoryMeasurement(device, status, None, baseline, wall, stopped_reason)
    code = child.returncode
    if code is not None and code < 0:
        name = _signal_name(-code)
        if -code == 9:
            # Nothing in the workload sends SIGKILL; the kernel's out-of-memory killer does.
            reason = f"killed by {name} (most likely the kernel's out-of-memory killer)"
            return MemoryMeasurement(device, "out_of_memory", None, baseline, wall, reason)
        return MemoryMeasurement(device, "error", None, baseline, wall, f"killed by {name}")
    detail = f": {log}" if log else ""
    return MemoryMeasurement(
        device, "error", None, baseline, wall, f"workload process exited with code {code}{detail}"
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --------------------------------------------------------------------------- activation calibration


def _device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def calibration_workload(
    backbone: str, patch_size: int, num_patches: int, device: str, bf16: bool, channels_last: bool
) -> float:
    """One forward + backward of the backbone over `num_patches` patches (run inside measure_peak).

    The model holds what it holds in a training step: parameters, AdamW's moments (allocated by
    a zero step, as `warm_optimizer_state` does for a trial, which also leaves the optimizer
    step's freed temporaries with the allocator) and, from the backward on, gradients. All of it
    is the same in every run, so the difference between two runs with different patch counts is
    the activation memory alone, and what the smaller run holds beyond parameters, gradients,
    moments and activations is the step's measured fixed overhead.
    """
    torch.manual_seed(0)
    model = build_backbone(backbone, 256).to(device)
    model.train()
    warm_optimizer_state(model, torch.optim.AdamW(model.parameters()))
    batch = torch.randn(num_patches, 3, patch_size, patch_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(_device_type(device), dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        out = model(batch)
    out.float().square().mean().backward()
    return float(out.detach().float().abs().sum())


@dataclass(frozen=True)
class Calibration:
    """Measured memory behaviour of one backbone on one device, precision and memory format.

    ``bytes_per_pixel`` (c) is the training activation memory per input pixel (forward +
    backward); ``overhead_bytes`` is what one training step costs beyond parameters, gradients,
    AdamW's two moments and c x pixels: the optimizer step's freed temporaries the C allocator
    keeps, kernel workspaces, autograd bookkeeping, allocator slack. It does not grow with the
    number of patches, so the analytic model adds it once.
    """

    bytes_per_pixel: float
    overhead_bytes: int


_CALIBRATION: dict[str, Calibration] = {}
# The two calibration runs hold the pixels of (2, 6) patches of 256 px whatever the patch size:
# their difference (262 k pixels, 100-600 MiB of activations) is what c is read from, and the C
# allocator's placement noise (tens of MiB either way on a peak) must stay small beside it. A
# fixed (2, 6) patches made the difference 4x smaller at 128 px than at 256 px, and 16x at 64 px.
_CALIBRATION_REFERENCE_PATCH = 256
_CALIBRATION_COUNTS = (2, 6)
# Stored with every cached calibration; an entry of another method is measured again. 2: patch
# counts from `calibration_counts`, AdamW state present in the calibration runs.
_CALIBRATION_METHOD = 2


def calibration_counts(patch_size: int) -> tuple[int, int]:
    """Patch counts of the two calibration runs at `patch_size`: (2, 6) patches' worth of
    256 px pixels, at least (1, 3) patches for patches larger than that."""
    if patch_size <= 0:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    scale = (_CALIBRATION_REFERENCE_PATCH / patch_size) ** 2
    small = max(1, round(_CALIBRATION_COUNTS[0] * scale))
    return small, 3 * small


def calibrate_backbone(
    backbone: str,
    *,
    device: str = "cpu",
    bf16: bool = False,
    channels_last: bool = False,
    patch_size: int = 128,
    cache_file: str | os.PathLike[str] | None = None,
) -> Calibration:
    """Measure (once) c and the fixed overhead of a training step for `backbone`.

    c is the peak difference between two forward/backward runs over `calibration_counts`
    patches divided by the extra pixels; the overhead is what the smaller run's peak holds beyond
    parameters, gradients, AdamW's moments and c x pixels. Cached in memory and, if given, in the
    JSON `cache_file` (keyed by backbone, device type, precision, memory format and patch size; an
    entry measured by an earlier method is measured again).
    """
    precision = "bf16" if bf16 else "fp32"
    layout = "cl" if channels_last else "cf"
    key = f"{backbone}|{_device_type(device)}|{precision}|{layout}|{patch_size}"
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    counts = calibration_counts(patch_size)
    stored: dict[str, dict[str, Any]] = {}
    if cache_file is not None and Path(cache_file).is_file():
        stored = json.loads(Path(cache_file).read_text())
        entry = stored.get(key)
        if entry is not None and entry.get("method") == _CALIBRATION_METHOD:
            _CALIBRATION[key] = Calibration(float(entry["bytes_per_pixel"]), int(entry["overhead_bytes"]))
            return _CALIBRATION[key]
    peaks = []
    for count in counts:
        result = measure_peak(
            "worker.patchgd.memory:calibration_workload",
            backbone,
            patch_size,
            count,
            device,
            bf16,
            channels_last,
            device=device,
            isolate=True,
            timeout_s=600,
        )
        if not result.fits or result.peak_bytes is None:
            raise RuntimeError(f"calibration of {backbone} failed: {result.reason}")
        peaks.append(result.peak_bytes)
    small, large = counts
    pixels = patch_size * patch_size
    per_pixel = max(peaks[1] - peaks[0], 0) / ((large - small) * pixels)
    params = sum(p.numel() for p in build_backbone(backbone, 256).parameters())
    overhead = max(0, int(peaks[0] - small * per_pixel * pixels - ADAM_BYTES_PER_PARAM * params))
    calibration = Calibration(per_pixel, overhead)
    _CALIBRATION[key] = calibration
    if cache_file is not None:
        stored[key] = {
            **dataclasses.asdict(calibration),
            "method": _CALIBRATION_METHOD,
            "counts": list(counts),
        }
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(stored, indent=2, sort_keys=True))
    return calibration


def activation_bytes_per_pixel(
    backbone: str,
    *,
    device: str = "cpu",
    bf16: bool = False,
    channels_last: bool = False,
    patch_size: int = 128,
    cache_file: str | os.PathLike[str] | None = None,
) -> float:
    """Bytes of training activations per input pixel (forward + backward): c of `calibrate_backbone`."""
    return calibrate_backbone(
        backbone,
        device=device,
        bf16=bf16,
        channels_last=channels_last,
        patch_size=patch_size,
        cache_file=cache_file,
    ).bytes_per_pixel


# --------------------------------------------------------------------------- analytic model


@dataclass
class MemoryEstimate:
    """A predicted peak, with the terms it is made of (bytes)."""

    total_bytes: int
    terms: dict[str, int]

    @property
    def total_gib(self) -> float:
        """The predicted peak in GiB."""
        return self.total_bytes / GIB


_PARAM_COUNTS: dict[tuple, tuple[int, int]] = {}


def _patchgd_param_counts(cfg: PatchGDConfig) -> tuple[int, int]:
    key = (
        cfg.backbone,
        cfg.latent_dim,
        cfg.head,
        cfg.head_width,
        cfg.num_classes,
        cfg.grid.n,
        cfg.in_channels,
    )
    if key not in _PARAM_COUNTS:
        # On the meta device: shapes only, no memory and no random initialisation to wait for.
        with torch.device("meta"):
            model = build_patchgd_model(cfg, load_pretrained=False)
        _PARAM_COUNTS[key] = (
            sum(p.numel() for p in model.backbone.parameters()),
            sum(p.numel() for p in model.head.parameters()),
        )
    return _PARAM_COUNTS[key]


def _baseline_param_count(cfg: BaselineConfig) -> int:
    key = ("baseline", cfg.backbone, cfg.num_classes, cfg.in_channels)
    if key not in _PARAM_COUNTS:
        with torch.device("meta"):
            model = build_baseline_model(cfg, load_pretrained=False)
        _PARAM_COUNTS[key] = (sum(p.numel() for p in model.parameters()), 0)
    return _PARAM_COUNTS[key][0]


def estimate_patchgd_bytes(
    cfg: PatchGDConfig,
    *,
    bytes_per_pixel: float,
    streaming: bool = False,
    batch_size: int | None = None,
    patches_per_step: int | None = None,
    overhead_bytes: int = 0,
) -> MemoryEstimate:
    """Predicted peak of one PatchGD training step.

    params + grads + Adam state (16 B/param) + Adam's step temporary for the head (4 B/param;
    the backbone's is measured in the overhead) + k*B*c*P^2
    activations of the patches re-encoded with gradient + Z (the map, its grad-carrying copy and
    its gradient) + head activations + the image buffer (the whole normalized batch in memory, or
    only the patches in flight when streaming) + the calibrated fixed overhead of a step.
    `bytes_per_pixel` and `overhead_bytes` come from `calibrate_backbone`.
    """
    batch = cfg.batch_size if batch_size is None else batch_size
    k = cfg.k if patches_per_step is None else patches_per_step
    backbone_params, head_params = _patchgd_param_counts(cfg)
    n, p, s = cfg.grid.n, cfg.patch_size, cfg.image_size
    z_cells = batch * cfg.latent_dim * n * n
    # The reference head: four conv blocks each keep conv out, BN out and dropout mask for
    # backward; the first (stride 1) dominates, at head_width channels on an n x n (>= 9) map.
    # The pooled head: two stride-1 blocks, each keeping conv out and BN out, on the n x n map.
    if cfg.head == "reference":
        side = max(n, 9)
        head_act = batch * cfg.head_width * side * side * FLOAT_BYTES * 4 * 2
    elif cfg.head == "pooled":
        head_act = batch * cfg.head_width * max(n, 2) ** 2 * FLOAT_BYTES * 2 * 2
    else:
        head_act = 0
    pixels_in_flight = batch * k * 3 * p * p
    terms = {
        "params_grads_optimizer": ADAM_BYTES_PER_PARAM * (backbone_params + head_params),
        "optimizer_workspace": OPTIMIZER_WORKSPACE_BYTES_PER_PARAM * head_params,
        "activations": int(math.ceil(k * batch * bytes_per_pixel * p * p)),
        "latent_map": 3 * z_cells * FLOAT_BYTES,
        "head_activations": head_act,
        "image_buffer": (pixels_in_flight if streaming else batch * 3 * s * s) * FLOAT_BYTES,
        "runtime_overhead": overhead_bytes,
    }
    return MemoryEstimate(sum(terms.values()), terms)


def estimate_baseline_bytes(
    cfg: BaselineConfig,
    *,
    bytes_per_pixel: float,
    batch_size: int | None = None,
    image_size: int | None = None,
    overhead_bytes: int = 0,
) -> MemoryEstimate:
    """Predicted peak of one full-image baseline step: params/grads/Adam + B*c*S^2 + the image +
    the calibrated fixed overhead (which holds Adam's step temporaries, see
    `OPTIMIZER_WORKSPACE_BYTES_PER_PARAM`)."""
    batch = cfg.batch_size if batch_size is None else batch_size
    s = cfg.image_size if image_size is None else image_size
    terms = {
        "params_grads_optimizer": ADAM_BYTES_PER_PARAM * _baseline_param_count(cfg),
        "activations": int(math.ceil(batch * bytes_per_pixel * s * s)),
        "image_buffer": batch * 3 * s * s * FLOAT_BYTES,
        "runtime_overhead": overhead_bytes,
    }
    return MemoryEstimate(sum(terms.values()), terms)


# --------------------------------------------------------------------------- measured trials


def warm_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Allocate the optimizer's state the way every step after the first has it.

    A measured trial runs one (partial) step, and Adam creates its moment buffers only at its
    first ``step()``, after the activations are gone. From the second step on those buffers live
    through the whole forward/backward, so a trial without them under-reports the steady-state
    peak by 8 bytes per parameter. A step with zero gradients creates them and moves no weight
    (Adam's update is zero for a zero gradient; weight decay is switched off for it).
    """
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, decay in zip(optimizer.param_groups, decays, strict=True):
        group["weight_decay"] = decay


# The first inner iteration allocates the gradients during its backward; from the second on they
# are alive during the forward too. Two iterations therefore reach the step's steady-state peak.
TRIAL_INNER_ITERATIONS = 2
# The fill pass encodes chunk after chunk without gradients into a Z that exists in full from the
# start; every chunk allocates and frees the same, so its peak is reached at the first chunk and
# is below an inner iteration's (same k patches, with gradients). A trial encodes only this many
# fill chunks: the same peak, without a forward over the whole S x S image (minutes on a CPU).
TRIAL_FILL_CHUNKS = 2


class SyntheticPatchSource:
    """A `PatchSource` of random patches made on demand: a streamed image that never exists.

    Each call generates only the requested ``[B, k, C, P, P]`` patches, like a streaming reader
    decodes only the regions it is asked for, so a measured trial over it holds the patches in
    flight and nothing of size S^2. Patch values are random (memory does not depend on them).
    """

    def __init__(self, batch_size: int, channels: int, grid: Any, seed: int = 0) -> None:
        self.batch_size = batch_size
        self.channels = channels
        self.grid = grid
        self._generator = torch.Generator().manual_seed(seed)

    def patches(self, indices: torch.Tensor) -> torch.Tensor:
        """Random float32 patches ``[B, k, C, P, P]`` for ``[k]`` or ``[B, k]`` indices."""
        k = torch.as_tensor(indices).shape[-1]
        p = int(self.grid.patch_size)
        return torch.randn(self.batch_size, k, self.channels, p, p, generator=self._generator)


def patchgd_trial(
    cfg_dict: dict[str, Any],
    device: str,
    inner_iterations: int = TRIAL_INNER_ITERATIONS,
    streamed_from: str | None = None,
    streamed: bool = False,
    fill_chunks: int | None = TRIAL_FILL_CHUNKS,
) -> dict[str, float]:
    """A partial PatchGD outer step (fill pass + `inner_iterations` inner iterations): the
    workload the planner and benchmarks measure. Runs inside `measure_peak`.

    Random images held in memory; with `streamed`, a `SyntheticPatchSource` that makes patches
    on demand (the whole batch is never in memory); with `streamed_from`, one image whose patches
    are read from that file region by region (batch 1) as `StreamingPatchSource` does in training.
    The fill pass stops after `fill_chunks` chunks (None: all), see `TRIAL_FILL_CHUNKS`.
    """
    cfg = PatchGDConfig.from_dict(cfg_dict)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_patchgd_model(cfg, load_pretrained=False).to(device)
    model.train()
    if fill_chunks is not None:
        full_fill = model.fill_latent

        def bounded_fill(source: Any, chunk_order: Any, **options: Any) -> torch.Tensor:
            return full_fill(source, itertools.islice(chunk_order, fill_chunks), **options)

        model.fill_latent = bounded_fill
    optimizer = build_optimizer(model, cfg)
    warm_optimizer_state(model, optimizer)
    with contextlib.ExitStack() as stack:
        if streamed_from is not None:
            reader = stack.enter_context(open_region_reader(streamed_from, level=0))
            source: Any = StreamingPatchSource(reader, cfg.grid)
        elif streamed:
            source = SyntheticPatchSource(cfg.batch_size, cfg.in_channels, cfg.grid, seed=cfg.seed)
        else:
            shape = (cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
            source = TensorPatchSource(torch.randn(shape, generator=generator).to(device), cfg.grid)
        labels = torch.randint(0, cfg.num_classes, (source.batch_size,), generator=generator)
        stats = patchgd_step(
            model, optimizer, source, labels, cfg, generator=generator, max_inner_iterations=inner_iterations
        )
    return {"seconds": stats.seconds, "patches_encoded": stats.num_patches_encoded}


def baseline_trial(cfg_dict: dict[str, Any], device: str) -> dict[str, float]:
    """One full-image baseline training step on random images (a `measure_peak` workload)."""
    cfg = BaselineConfig.from_dict(cfg_dict)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_baseline_model(cfg, load_pretrained=False).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    warm_optimizer_state(model, optimizer)
    images = torch.randn(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=generator)
    stats = baseline_step(model, optimizer, images.to(device), labels, cfg)
    return {"seconds": stats.seconds}


# --------------------------------------------------------------------------- planner


@dataclass
class Plan:
    """The planner's answer: settings that fit the budget (or why none do), predicted vs measured."""

    algorithm: str
    fits: bool
    budget_bytes: int
    config: dict[str, Any] | None
    batch_size: int | None
    predicted_bytes: int | None
    measured_bytes: int | None
    reason: str
    patches_per_step: int | None = None
    image_size: int | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored with the task, shown to the user)."""
        return dataclasses.asdict(self)


def enforce_budget(budget_gib: float, device: str = "cuda") -> float:
    """Cap this process's CUDA caching allocator at `budget_gib`; returns the fraction set.

    Allocations past the cap raise ``torch.cuda.OutOfMemoryError`` instead of using the rest of
    the card, so a planned run cannot silently exceed its budget.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("enforce_budget needs CUDA; on CPU the planner's measured trial is the check")
    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _check_budget(budget_gib: float) -> int:
    if not isinstance(budget_gib, int | float) or not math.isfinite(budget_gib) or budget_gib <= 0:
        raise ConfigError(f"memory budget must be a positive number of GiB, got {budget_gib!r}")
    return int(budget_gib * GIB)


def _patchgd_candidates(cfg: PatchGDConfig) -> list[tuple[int, int]]:
    """(batch, k) in order of preference: keep the batch, shrink k (exact same gradient under
    full-sweep accumulation, only slower), then shrink the batch."""
    ks = sorted({cfg.k} | {max(1, cfg.k >> i) for i in range(1, 32)}, reverse=True)
    return [(b, k) for b in range(cfg.batch_size, 0, -1) for k in ks]


def _with(cfg: PatchGDConfig, batch: int, k: int) -> PatchGDConfig:
    # inner_iterations / accumulation_steps given for the old k may not suit the new one: a
    # full sweep (their defaults) is what the user's settings meant.
    return dataclasses.replace(
        cfg,
        batch_size=batch,
        patches_per_step=k,
        sampling=None,
        inner_iterations=None,
        accumulation_steps=None,
    )


@dataclass
class _Candidate:
    """One setting the planner may choose, with its predicted peak."""

    batch_size: int
    estimate: MemoryEstimate
    config: PatchGDConfig | BaselineConfig
    label: str  # "batch 2, k=8" / "batch 1 at 1024 px": how the user reads the choice
    trial_args: tuple[Any, ...]
    fields: dict[str, Any]  # patches_per_step or image_size, reported on the Plan


def _search(
    algorithm: str,
    candidates: list[_Candidate],
    budget: int,
    device: str,
    trial: Callable[..., Any],
    *,
    safety: float,
    verify: bool,
    max_trials: int,
    nothing_fits: str,
) -> Plan:
    """Walk the candidates in order of preference: the first predicted under `safety` x budget
    is tried for real (when `verify`); a measured overshoot moves on to strictly smaller ones."""
    trials: list[dict[str, Any]] = []
    start = 0
    for _ in range(max_trials):
        under = (
            i for i in range(start, len(candidates)) if candidates[i].estimate.total_bytes <= safety * budget
        )
        pos = next(under, None)
        if pos is None:
            reason = nothing_fits
            if trials:
                reason = f"does not fit: every measured trial exceeded {budget / GIB:.2f} GiB"
            smallest = candidates[-1].estimate.total_bytes
            return Plan(algorithm, False, budget, None, None, smallest, None, reason, trials=trials)
        chosen = candidates[pos]
        predicted = chosen.estimate.total_bytes
        if not verify:
            return Plan(
                algorithm,
                True,
                budget,
                chosen.config.to_dict(),
                chosen.batch_size,
                predicted,
                None,
                "predicted only (not verified by a measured trial)",
                trials=trials,
                **chosen.fields,
            )
        measured = measure_peak(
            trial,
            chosen.config.to_dict(),
            device,
            *chosen.trial_args,
            device=device,
            limit_bytes=int(budget * 1.02),
            timeout_s=900,
        )
        trials.append(
            {
                "batch_size": chosen.batch_size,
                **chosen.fields,
                "predicted_bytes": predicted,
                "predicted_terms": chosen.estimate.terms,
                **measured.to_dict(),
            }
        )
        if measured.fits and measured.peak_bytes is not None and measured.peak_bytes <= budget:
            reason = f"{chosen.label}: measured {measured.peak_bytes / GIB:.2f} GiB of {budget / GIB:.2f} GiB"
            return Plan(
                algorithm,
                True,
                budget,
                chosen.config.to_dict(),
                chosen.batch_size,
                predicted,
                measured.peak_bytes,
                reason,
                trials=trials,
                **chosen.fields,
            )
        if measured.status in ("error", "timeout"):
            return Plan(
                algorithm,
                False,
                budget,
                None,
                None,
                predicted,
                None,
                f"trial failed: {measured.reason}",
                trials=trials,
            )
        # Over budget: the model under-predicted; continue with strictly smaller settings.
        start = pos + 1
    return Plan(
        algorithm,
        False,
        budget,
        None,
        None,
        None,
        None,
        f"does not fit: {max_trials} measured trials all exceeded {budget / GIB:.2f} GiB",
        trials=trials,
    )


def calibration_patch_size(cfg: PatchGDConfig | BaselineConfig) -> int:
    """The patch size the backbone is calibrated at for `cfg`: PatchGD's own patch size (the
    activation cost per pixel depends on it, through padding, rounding of strided layers and
    the fixed-size pooled tail), or for the baseline the image size capped at 256 px (the
    per-pixel cost settles by then, and a bigger calibration would cost as much as the step)."""
    if isinstance(cfg, PatchGDConfig):
        return int(cfg.patch_size)
    return int(min(cfg.image_size, 256))


# Stored with every cached step calibration; an entry of another method is measured again.
_STEP_CALIBRATION_METHOD = 2
# The largest baseline calibration image: two runs at <= 512 px cost less than one step at the
# sizes a budget is planned for. The per-pixel cost still falls beyond it (the larger the image,
# the more of its activations are above glibc's 32 MiB mmap ceiling and returned exactly when
# freed, instead of sitting in the heap with its slack), so larger baselines are over-predicted
# (ResNet50 at 896 px by 11%, docs/benchmarks.md).
_BASELINE_CALIBRATION_MAX = 512


def step_calibration_points(cfg: PatchGDConfig | BaselineConfig) -> tuple[Any, Any]:
    """The two small configurations a step calibration measures for `cfg` (smaller first).

    PatchGD: batch 1, the configured patch size, k from `calibration_counts` (so the pair holds
    the pixels of (2, 6) patches of 256 px), on the smallest grid that holds two full inner
    iterations of the larger k (n >= 3; with fewer patches the second iteration, where the
    step's peak is, would encode only the rest of the sweep), streamed: what differs between the
    two is the k patches encoded with gradient.
    Baseline: batch 1 at two sizes (multiples of 32): min(S, 512) (at least 128) and about
    1/sqrt(3) of it (at least 64).
    """
    if isinstance(cfg, PatchGDConfig):
        small, large = calibration_counts(int(cfg.patch_size))
        n = max(3, math.isqrt(2 * large - 1) + 1)
        return tuple(
            dataclasses.replace(
                cfg,
                batch_size=1,
                image_size=n * int(cfg.patch_size),
                patches_per_step=k,
                sampling=None,
                inner_iterations=None,
                accumulation_steps=None,
            )
            for k in (small, large)
        )
    # At least 64 px: a backbone's last BatchNorm must see more than one value per channel in a
    # batch of 1 (resnets reduce 32 px to 1×1), so the smaller point is 64 px and the larger 128.
    top = max(128, min(int(cfg.image_size), _BASELINE_CALIBRATION_MAX) // 32 * 32)
    low = max(64, round(top / math.sqrt(3) / 32) * 32)
    return tuple(dataclasses.replace(cfg, batch_size=1, image_size=size) for size in (low, top))


def calibration_from_peaks(cfg: PatchGDConfig | BaselineConfig, peaks: tuple[int, int]) -> Calibration:
    """c and the fixed overhead from the measured peaks of `step_calibration_points(cfg)`.

    c is the peak difference over the pixel difference, less the 12 B/px of float input the
    model counts in its image-buffer term; the overhead is what the smaller run held beyond the
    model's other terms for it (parameters, gradients, AdamW state, Z, head, input) at that c.
    It may be negative: a step reuses for its activations memory the allocator kept from the
    optimizer's warm-up, which a sum of separately counted terms would count twice.
    """
    first, second = step_calibration_points(cfg)
    input_bytes_per_pixel = 3 * FLOAT_BYTES
    if isinstance(cfg, PatchGDConfig):
        pixels = (second.k - first.k) * cfg.patch_size**2
        per_pixel = max(peaks[1] - peaks[0], 0) / pixels - input_bytes_per_pixel
        per_pixel = max(per_pixel, 0.0)
        fixed = estimate_patchgd_bytes(first, bytes_per_pixel=per_pixel, streaming=True)
    else:
        pixels = second.image_size**2 - first.image_size**2
        per_pixel = max(max(peaks[1] - peaks[0], 0) / pixels - input_bytes_per_pixel, 0.0)
        fixed = estimate_baseline_bytes(first, bytes_per_pixel=per_pixel)
    return Calibration(per_pixel, int(peaks[0] - fixed.total_bytes))


def calibrate_step(
    cfg: PatchGDConfig | BaselineConfig,
    device: str = "cpu",
    *,
    cache_file: str | os.PathLike[str] | None = None,
) -> Calibration:
    """Measure (once) c and the fixed overhead of a training step like `cfg`'s: the planner's own
    trial (`patchgd_trial` streamed, or `baseline_trial`) at the two `step_calibration_points`.

    Unlike `calibrate_backbone` (a bare forward/backward of the backbone), the runs hold all a
    step holds (AdamW state from a real step, the fill pass, Z, the head, two inner iterations)
    and are measured the way the planner's verification is; the model is linear in the pixels
    encoded with gradient only over a limited range (the C allocator reuses what the optimizer's
    warm-up freed), so calibrating at the configured patch size and a k near the usual ones
    keeps its prediction close. Cached in memory and, if given, in the JSON `cache_file`, keyed
    by algorithm, backbone, device type, precision, memory format and size.
    """
    dev_type = _device_type(device)
    algorithm = "patchgd" if isinstance(cfg, PatchGDConfig) else "baseline"
    first, second = step_calibration_points(cfg)
    size = cfg.patch_size if isinstance(cfg, PatchGDConfig) else second.image_size
    precision = "bf16" if cfg.use_bf16(dev_type) else "fp32"
    layout = "cl" if cfg.use_channels_last(dev_type) else "cf"
    key = f"{algorithm}:{cfg.backbone}|{dev_type}|{precision}|{layout}|{size}"
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    stored: dict[str, dict[str, Any]] = {}
    if cache_file is not None and Path(cache_file).is_file():
        stored = json.loads(Path(cache_file).read_text())
        entry = stored.get(key)
        if entry is not None and entry.get("method") == _STEP_CALIBRATION_METHOD:
            _CALIBRATION[key] = Calibration(float(entry["bytes_per_pixel"]), int(entry["overhead_bytes"]))
            return _CALIBRATION[key]
    peaks = []
    for point in (first, second):
        if algorithm == "patchgd":
            result = measure_peak(
                patchgd_trial,
                point.to_dict(),
                device,
                TRIAL_INNER_ITERATIONS,
                None,
                True,
                device=device,
                timeout_s=900,
            )
        else:
            result = measure_peak(baseline_trial, point.to_dict(), device, device=device, timeout_s=900)
        if not result.fits or result.peak_bytes is None:
            raise RuntimeError(f"calibration of {cfg.backbone} failed: {result.reason}")
        peaks.append(result.peak_bytes)
    calibration = calibration_from_peaks(cfg, (peaks[0], peaks[1]))
    _CALIBRATION[key] = calibration
    if cache_file is not None:
        stored[key] = {
            **dataclasses.asdict(calibration),
            "method": _STEP_CALIBRATION_METHOD,
            "peaks": peaks,
        }
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(stored, indent=2, sort_keys=True))
    return calibration


def _model_terms(
    cfg: PatchGDConfig | BaselineConfig,
    device: str,
    calibration: Calibration | None,
    cache_file: str | os.PathLike[str] | None,
) -> dict[str, float]:
    """The calibrated terms of the analytic model (measured by `calibrate_step`, and cached, when
    not given)."""
    if calibration is None:
        calibration = calibrate_step(cfg, device, cache_file=cache_file)
    return {"bytes_per_pixel": calibration.bytes_per_pixel, "overhead_bytes": calibration.overhead_bytes}


def predict_peak(
    cfg: PatchGDConfig | BaselineConfig,
    device: str = "cpu",
    *,
    streamed: bool = False,
    calibration: Calibration | None = None,
    cache_file: str | os.PathLike[str] | None = None,
) -> MemoryEstimate:
    """The analytic model's peak of one training step of `cfg` exactly as configured (no search):
    what the settings would need, whatever the budget."""
    model_terms = _model_terms(cfg, device, calibration, cache_file)
    if isinstance(cfg, PatchGDConfig):
        return estimate_patchgd_bytes(cfg, **model_terms, streaming=streamed)
    if isinstance(cfg, BaselineConfig):
        return estimate_baseline_bytes(cfg, **model_terms)
    raise TypeError(f"expected a PatchGDConfig or BaselineConfig, got {type(cfg).__name__}")


def plan_patchgd(
    cfg: PatchGDConfig,
    budget_gib: float,
    device: str = "cpu",
    *,
    safety: float = DEFAULT_SAFETY,
    verify: bool = True,
    max_trials: int = 3,
    calibration: Calibration | None = None,
    cache_file: str | os.PathLike[str] | None = None,
    streamed: bool = False,
) -> Plan:
    """Choose batch size and k (patches per inner step) so a PatchGD step stays under the budget.

    `calibration` defaults to a (cached) measurement of the backbone at the configured patch
    size on `device`. The analytic model picks the first (batch, k) whose prediction is under
    `safety` x budget (keeping the batch and shrinking k first), then a measured trial (fill pass
    + two inner iterations) confirms it; a measured peak over the budget shrinks the choice and
    tries again. With `streamed`, prediction and trial hold only the patches in flight (the trial
    reads a `SyntheticPatchSource`), never the B x 3 x S^2 image buffer.
    """
    budget = _check_budget(budget_gib)
    model_terms = _model_terms(cfg, device, calibration, cache_file)
    candidates = [
        _Candidate(
            batch_size=batch,
            estimate=estimate_patchgd_bytes(
                cfg, **model_terms, streaming=streamed, batch_size=batch, patches_per_step=k
            ),
            config=_with(cfg, batch, k),
            label=f"batch {batch}, k={k}" + (" (streamed)" if streamed else ""),
            trial_args=(TRIAL_INNER_ITERATIONS, None, streamed),
            fields={"patches_per_step": k},
        )
        for batch, k in _patchgd_candidates(cfg)
    ]
    smallest = candidates[-1].estimate  # batch 1, k = 1
    nothing_fits = (
        f"does not fit: even batch 1 with k=1 is predicted at {smallest.total_gib:.2f} GiB "
        f"(parameters, gradients and optimizer state alone "
        f"{smallest.terms['params_grads_optimizer'] / GIB:.2f} GiB) against a budget of "
        f"{budget / GIB:.2f} GiB"
    )
    return _search(
        "patchgd",
        candidates,
        budget,
        device,
        patchgd_trial,
        safety=safety,
        verify=verify,
        max_trials=max_trials,
        nothing_fits=nothing_fits,
    )


def _baseline_candidates(cfg: BaselineConfig) -> list[tuple[int, int]]:
    """(batch, size) in order of preference: shrink the batch first, then the resolution
    (multiples of 32, the stride of every catalog backbone) at batch 1."""
    sizes = [cfg.image_size] + [s for s in range((cfg.image_size - 1) // 32 * 32, 31, -32)]
    return [(b, cfg.image_size) for b in range(cfg.batch_size, 0, -1)] + [(1, s) for s in sizes[1:]]


def plan_baseline(
    cfg: BaselineConfig,
    budget_gib: float,
    device: str = "cpu",
    *,
    safety: float = DEFAULT_SAFETY,
    verify: bool = True,
    max_trials: int = 3,
    calibration: Calibration | None = None,
    cache_file: str | os.PathLike[str] | None = None,
) -> Plan:
    """Choose batch size, then resolution, so a full-image baseline step stays under the budget.

    Same procedure as `plan_patchgd`: prediction first, then a measured training step, shrinking
    on a measured overshoot; "does not fit" when even batch 1 at 32 px is over the budget.
    """
    budget = _check_budget(budget_gib)
    model_terms = _model_terms(cfg, device, calibration, cache_file)
    candidates = []
    for batch, size in _baseline_candidates(cfg):
        note = "" if size == cfg.image_size else f" (resolution reduced from {cfg.image_size})"
        candidates.append(
            _Candidate(
                batch_size=batch,
                estimate=estimate_baseline_bytes(cfg, **model_terms, batch_size=batch, image_size=size),
                config=dataclasses.replace(cfg, batch_size=batch, image_size=size),
                label=f"batch {batch} at {size} px{note}",
                trial_args=(),
                fields={"image_size": size},
            )
        )
    smallest = candidates[-1].estimate  # batch 1 at 32 px
    nothing_fits = (
        f"does not fit: even batch 1 at 32 px is predicted at {smallest.total_gib:.2f} GiB against a "
        f"budget of {budget / GIB:.2f} GiB"
    )
    return _search(
        "baseline",
        candidates,
        budget,
        device,
        baseline_trial,
        safety=safety,
        verify=verify,
        max_trials=max_trials,
        nothing_fits=nothing_fits,
    )


def plan(
    cfg: PatchGDConfig | BaselineConfig,
    budget_gib: float,
    device: str = "cpu",
    *,
    streamed: bool = False,
    safety: float = DEFAULT_SAFETY,
    verify: bool = True,
    max_trials: int = 3,
    calibration: Calibration | None = None,
    cache_file: str | os.PathLike[str] | None = None,
) -> Plan:
    """Plan a training run of either algorithm under `budget_gib` (see `plan_patchgd` and
    `plan_baseline`). `streamed` means PatchGD reads patches on demand from a streamed source, so
    neither the prediction nor the measured trial holds the image; the baseline always needs the
    whole image in memory, so it cannot be planned streamed."""
    options = dict(
        safety=safety, verify=verify, max_trials=max_trials, calibration=calibration, cache_file=cache_file
    )
    if isinstance(cfg, PatchGDConfig):
        return plan_patchgd(cfg, budget_gib, device, streamed=streamed, **options)
    if isinstance(cfg, BaselineConfig):
        if streamed:
            raise ValueError("the baseline trains on whole images in memory; it cannot be planned streamed")
        return plan_baseline(cfg, budget_gib, device, **options)
    raise TypeError(f"expected a PatchGDConfig or BaselineConfig, got {type(cfg).__name__}")
