"""Training jobs: a task's run (``training.train``), the reaper and re-dispatcher that keep tasks
moving when workers die or messages are lost, and planning a run under a memory budget.

The task names come from ``backend.queue`` (the web process sends by them); the engine is
imported inside the task bodies, so importing this module stays torch-free.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from celery import signals

from backend.config import get_settings
from backend.queue import MEMORY_PLAN, TRAINING_EXPORT, TRAINING_REAP, TRAINING_REDISPATCH, TRAINING_TRAIN

# Subfolder of the data dir where plans are written (Celery results are switched off); the web
# process reads them back from there.
from backend.training.service import PLAN_DIR
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)

#: Calibration cache shared by every plan made on this data dir.
CALIBRATION_FILE = "memory_calibration.json"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def plan_report_path(data_dir: Path, token: str) -> Path:
    """Where the plan requested under ``token`` is written (and read back)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"Invalid plan token {token!r}: use 1 to 64 letters, digits, '-' or '_'.")
    return data_dir / PLAN_DIR / f"{token}.json"


def plan_one(
    algorithm: str,
    config: dict[str, Any],
    budget_gib: float,
    device: str,
    *,
    streamed: bool = False,
    verify: bool = True,
    cache_file: Path | None = None,
) -> dict[str, Any]:
    """Plan one algorithm's settings under the budget: what the settings as given would need
    (``requested``, ``requested_bytes``), and what the planner chooses (batch and k for PatchGD;
    batch, then resolution, for the baseline), whether it fits, predicted and measured peaks."""
    from worker.patchgd.config import config_from_dict
    from worker.patchgd.memory import plan, predict_peak

    cfg = config_from_dict(algorithm, config)
    as_given = predict_peak(cfg, device, streamed=streamed, cache_file=cache_file)
    result = plan(cfg, budget_gib, device, streamed=streamed, verify=verify, cache_file=cache_file)
    requested: dict[str, Any] = {"batch_size": cfg.batch_size, "image_size": cfg.image_size}
    if algorithm == "patchgd":
        requested["patches_per_step"] = cfg.k
    return {
        "algorithm": result.algorithm,
        "fits": result.fits,
        "verified": result.measured_bytes is not None,
        "requested": requested,
        "requested_bytes": as_given.total_bytes,
        "requested_fits": as_given.total_bytes <= budget_gib * (1 << 30),
        "batch_size": result.batch_size,
        "patches_per_step": result.patches_per_step,
        "image_size": result.image_size
        if result.image_size is not None
        else (cfg.image_size if result.fits else None),
        "predicted_bytes": result.predicted_bytes,
        "measured_bytes": result.measured_bytes,
        "reason": result.reason,
        "plan": result.to_dict(),
    }


@signals.worker_process_init.connect
def _import_the_planner_early(**_: Any) -> None:
    """Import the engine's memory model in a new pool process, in the background: a plan then
    answers in seconds from its first request (importing torch and torchvision is most of a
    first plan's time otherwise). Only the import: CUDA is not touched."""
    import threading

    threading.Thread(
        target=importlib.import_module, args=("worker.patchgd.memory",), name="tessera-warm-up", daemon=True
    ).start()


@celery_app.task(name=MEMORY_PLAN)
def plan_memory(
    token: str,
    configs: dict[str, dict[str, Any]],
    budget_gib: float,
    streamed: bool = False,
    device: str | None = None,
    verify: bool = True,
    primary: str | None = None,
) -> dict[str, Any]:
    """Plan each algorithm of `configs` (``{"patchgd": {...}, "baseline": {...}}``, the
    hyperparameters of each) under `budget_gib` on this worker's device.

    With `verify`, each choice is confirmed by a measured trial (in a child interpreter, which
    works inside prefork pool processes); without, the calibrated model answers (seconds, once the
    backbone's calibration is cached in ``<data_dir>/memory_calibration.json``). Writes
    ``{token, device, budget_gib, seconds, algorithms: {name: plan_one(...)}}`` plus, at the top,
    the fields of the `primary` algorithm's plan (default: the first) to
    ``<data_dir>/memory_plans/<token>.json`` and returns it.
    """
    return make_plan(get_settings(), token, configs, budget_gib, streamed, device, verify, primary)


def make_plan(
    settings,  # noqa: ANN001 (Settings)
    token: str,
    configs: dict[str, dict[str, Any]],
    budget_gib: float,
    streamed: bool = False,
    device: str | None = None,
    verify: bool = True,
    primary: str | None = None,
) -> dict[str, Any]:
    """The body of ``memory.plan`` (see :func:`plan_memory`) for explicit settings.

    A plan that cannot be made (a calibration that fails on these settings, say) is written as
    ``{token, error}``, so whoever waits for it sees why instead of waiting for ever."""
    import torch

    started = time.monotonic()
    path = plan_report_path(settings.data_dir, token)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_file = settings.data_dir / CALIBRATION_FILE
    try:
        plans = {
            algorithm: plan_one(
                algorithm,
                config,
                budget_gib,
                device,
                streamed=streamed and algorithm == "patchgd",
                verify=verify,
                cache_file=cache_file,
            )
            for algorithm, config in configs.items()
        }
    except Exception as exc:
        logger.exception("plan %s failed", token)
        _write_report(path, {"token": token, "device": device, "error": f"The plan could not be made: {exc}"})
        raise
    first = primary if primary in plans else next(iter(plans))
    report: dict[str, Any] = {
        **plans[first],
        "token": token,
        "pid": os.getpid(),
        "device": device,
        "budget_gib": float(budget_gib),
        "algorithms": plans,
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_report(path, report)
    return report


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(report), encoding="utf-8")
    os.replace(partial, path)


# --------------------------------------------------------------------------- training runs

#: Lease heartbeats are sent at least this often (and at most every third of the lease).
HEARTBEAT_MAX_INTERVAL_SECONDS = 10.0
#: Shown for errors that are not the user's (the traceback goes to the worker's log).
GENERIC_ERROR = (
    "Training stopped on an unexpected error ({kind}); the details are in the worker's log. "
    "Retry the task to resume from its last checkpoint."
)


def dataset_index_from_report(dataset_dir: Path, report: dict[str, Any]):  # noqa: ANN201 (DatasetIndex)
    """The engine's dataset index built from a ready dataset's ``report.json`` (no rescan): the
    validated files with their class index (``class_to_index``) and split. The report's ``root``
    is relative to the extracted ``images/`` folder."""
    from worker.datasets.validate import IMAGES_DIR
    from worker.patchgd.data import DatasetIndex, Sample
    from worker.patchgd.errors import DatasetError

    root = (dataset_dir / IMAGES_DIR / report.get("root", "")).resolve()
    if not root.is_relative_to(dataset_dir.resolve()):
        raise DatasetError("the dataset report points outside its folder")
    class_to_index = {str(k): int(v) for k, v in (report.get("class_to_index") or {}).items()}
    classes = tuple(sorted(class_to_index, key=class_to_index.__getitem__))
    splits = report.get("splits") or {}
    samples = []
    for rel, label in sorted((report.get("labels") or {}).items()):
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise DatasetError(f"the dataset report names a file outside its folder: {rel}")
        split = str(splits.get(rel, "train"))
        samples.append(Sample(path=path, label=class_to_index[str(label)], split=split))
    if not samples:
        raise DatasetError("the dataset has no images")
    source = str(report.get("source", ""))
    return DatasetIndex(root=root, classes=classes, samples=tuple(samples), source=source)


class _Lease:
    """The worker's side of a claimed task: heartbeats, the cancel flag and whether the lease is
    still ours.

    A background thread writes the heartbeats and the progress: the training loop only hands it
    the newest snapshot (at most every ``task_progress_interval_seconds``), so a slow database
    never stalls a training step. Synchronous writes (:meth:`beat`, at an epoch's end) drop an
    older snapshot still waiting, so the row never goes back in time.
    """

    def __init__(self, settings, task_id: int, worker_id: str) -> None:  # noqa: ANN001 (Settings)
        import threading

        self.settings = settings
        self.task_id = task_id
        self.worker_id = worker_id
        self.lost = False
        self.cancel = False
        self.last_progress = 0.0
        self.first_step: int | None = None
        self.memory_total_bytes = 0
        self.coverage_n = 0
        self.last_coverage: list[int] | None = None
        self._cancel_noted = False
        self._lost_noted = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pending: dict[str, Any] | None = None
        # Guards only the hand-over of the snapshot (never held during a write, so the training
        # loop never waits for the database); ``_lock`` serialises the writes.
        self._handover = threading.Lock()
        interval = min(HEARTBEAT_MAX_INTERVAL_SECONDS, settings.task_lease_seconds / 3)
        self._thread = threading.Thread(
            target=self._beat, args=(interval,), name=f"tessera-lease-{task_id}", daemon=True
        )

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def beat(self, **progress: Any) -> None:
        """Write now (extending the lease), from the calling thread."""
        with self._lock:
            with self._handover:
                self._pending = None  # older than this write: it must not land after it
            self._write(progress)
        self._note_changes()

    def _write(self, progress: dict[str, Any]) -> None:
        from backend.training import service

        try:
            mine, cancel = service.heartbeat(self.settings, self.task_id, self.worker_id, **progress)
        except Exception:  # a database hiccup: the next beat tries again (the lease has slack)
            logger.warning("heartbeat of task %s failed", self.task_id, exc_info=True)
            return
        self.lost = self.lost or not mine
        self.cancel = cancel

    def event(self, kind: str, message: str, **data: Any) -> None:
        """One line in the task's log (never fatal: the log is not worth a training run)."""
        from backend.training import service

        try:
            service.record_event(
                self.settings, self.task_id, kind, message, worker_id=self.worker_id, data=data
            )
        except Exception:
            logger.warning("event %s of task %s not written", kind, self.task_id, exc_info=True)

    def _note_changes(self) -> None:
        if self.cancel and not self._cancel_noted:
            self._cancel_noted = True
            self.event("cancel_seen", "The worker saw the cancel request; stopping at the next step.")
        if self.lost and not self._lost_noted:
            self._lost_noted = True
            self.event(
                "lease_lost",
                f"Worker {self.worker_id} lost its lease (another worker took the task over); it stops "
                "without writing results.",
            )

    def coverage(self, counts: list[int] | None) -> dict[str, Any]:
        """The ``patch_coverage`` column's value for the engine's counts (empty for the baseline)."""
        if counts is None or not self.coverage_n:
            return {}
        self.last_coverage = counts
        return {"n": self.coverage_n, "counts": counts, "sampled": int(sum(counts))}

    def _beat(self, interval: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            with self._lock:
                with self._handover:
                    pending, self._pending = self._pending, None
                self._write(pending or {})
            self._note_changes()

    def on_progress(self, progress: Any) -> None:
        from backend.training import service

        if self.first_step is None and progress.phase == "train":
            self.first_step = progress.step
            service.note_attempt(
                self.settings,
                self.task_id,
                self.worker_id,
                first_step=progress.step,
                memory_total_bytes=self.memory_total_bytes,
            )
        if progress.patch_coverage is not None:
            self.last_coverage = progress.patch_coverage
        now = time.monotonic()
        if now - self.last_progress < self.settings.task_progress_interval_seconds:
            return
        self.last_progress = now
        extra = {}
        if progress.patch_coverage is not None:
            extra["patch_coverage"] = self.coverage(progress.patch_coverage)
        snapshot = dict(
            epoch=progress.epoch,
            step=progress.step,
            total_steps=progress.total_steps,
            fraction=float(progress.fraction),
            eta_seconds=float(progress.eta_seconds),
            images_per_s=float(progress.images_per_s),
            patches_per_s=float(progress.patches_per_s),
            phase=progress.phase[:32],
            peak_memory_bytes=int(progress.peak_memory_bytes),
            **extra,
        )
        with self._handover:
            self._pending = snapshot
        self._wake.set()

    def should_stop(self) -> bool:
        return self.cancel or self.lost


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _worker_id() -> str:
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_task(settings, task_id: int) -> str:  # noqa: ANN001, C901 (Settings; one linear story)
    """Claim task ``task_id`` and train it to an outcome; returns what happened."""
    from backend.db import session_scope
    from backend.models import TaskStatus
    from backend.training import service

    worker_id = _worker_id()
    with session_scope(settings) as session:
        outcome = service.claim(session, settings, task_id, worker_id)
        if outcome != "claimed":
            logger.info("task %s not claimed: %s", task_id, outcome)
            return outcome
        spec = service.run_spec(session, settings, task_id)
    logger.info("task %s claimed by %s (attempt %s)", task_id, worker_id, spec["attempt"])
    with _Lease(settings, task_id, worker_id) as lease:
        try:
            status, final, artifacts = _train(settings, task_id, worker_id, spec, lease)
        except Exception as exc:
            from worker.patchgd.errors import EngineError

            if lease.lost:
                logger.warning("task %s lost its lease and stopped: %s", task_id, exc)
                lease.event("error", f"Stopped after losing the lease: {type(exc).__name__}.")
                return "lost"
            if isinstance(exc, EngineError):
                logger.info("task %s failed: %s", task_id, exc)
                message = str(exc)
            elif _is_cuda_oom(exc) and spec.get("memory_budget_gib"):
                logger.info("task %s ran out of its memory budget: %s", task_id, exc)
                message = OVER_BUDGET_ERROR.format(budget=spec["memory_budget_gib"])
            else:
                logger.exception("task %s failed unexpectedly", task_id)
                message = GENERIC_ERROR.format(kind=type(exc).__name__)
            service.finish(settings, task_id, worker_id, TaskStatus.FAILED, error=message)
            return "failed"
    if lease.lost:
        logger.warning("task %s lost its lease (another worker took it over); nothing written", task_id)
        return "lost"
    service.finish(settings, task_id, worker_id, status, final_metrics=final, artifacts=artifacts)
    logger.info("task %s %s", task_id, status.value)
    return status.value


def apply_budget(budget_gib: float | None, device: Any) -> dict[str, Any] | None:
    """Hold the run to its memory budget where the device allows it.

    On CUDA the caching allocator is capped at the budget (``enforce_budget``): an allocation past
    it raises out-of-memory instead of using the rest of the card. On CPU nothing can cap a
    process's memory this way; the measured peak is still recorded against the budget and a run
    over it is reported (a warning, not a failure). Returns what was done (None: no budget).
    """
    if device.type == "cuda" and not budget_gib:
        import torch

        # A pool process trains one task after another: lift the cap an earlier task set.
        torch.cuda.set_per_process_memory_fraction(1.0, device.index or 0)
        return None
    if not budget_gib:
        return None
    if device.type == "cuda":
        from worker.patchgd.memory import enforce_budget

        fraction = enforce_budget(float(budget_gib), str(device))
        logger.info("memory budget %.2f GiB enforced on %s (fraction %.3f)", budget_gib, device, fraction)
        return {"device": "cuda", "enforced": True, "fraction": round(fraction, 6)}
    return {"device": device.type, "enforced": False}


#: The error of a run that ran out of its enforced budget on a GPU.
OVER_BUDGET_ERROR = (
    "Training ran out of its memory budget of {budget:g} GiB on the GPU. Plan the task with this "
    "budget (the new-task form's Plan button) and accept the plan, or raise the budget."
)


def _train(settings, task_id: int, worker_id: str, spec: dict[str, Any], lease: _Lease):  # noqa: ANN001, ANN202
    import torch

    from backend.models import TaskStatus
    from backend.training import service
    from worker.patchgd import config_from_dict, evaluate, export_all, make_loaders, train
    from worker.patchgd.errors import DatasetError, EngineError

    cfg = config_from_dict(spec["algorithm"], spec["config"])
    report_path = Path(spec["report_path"])
    if not report_path.is_file():
        raise DatasetError("the dataset's validation report is missing; upload the dataset again")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    index = dataset_index_from_report(Path(spec["dataset_dir"]), report)
    task_folder = Path(spec["task_dir"])
    loaders = make_loaders(
        index,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        cache_dir=task_folder / "cache",
        seed=cfg.seed,
        num_workers=0,  # prefork pool processes are daemons: they cannot start loader processes
        level=cfg.pyramid_level,  # None: level 0, decoded as a whole image
    )
    if "train" not in loaders:
        raise DatasetError("the dataset's training split is empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = apply_budget(spec.get("memory_budget_gib"), device)
    if memory is not None:
        service.record_memory_setup(settings, task_id, worker_id, memory)
    lease.memory_total_bytes = device_memory_bytes(device)
    lease.coverage_n = cfg.grid.n if spec["algorithm"] == "patchgd" else 0

    def on_epoch_end(metrics: Any) -> None:
        data = metrics.to_dict()
        data.pop("val_report", None)
        service.record_epoch(settings, task_id, worker_id, data)
        # The counts of the epoch's last step are the epoch's (evaluation samples no patches).
        lease.beat(epoch=metrics.epoch + 1, **_coverage_values(lease))

    def on_event(kind: str, info: dict[str, Any]) -> None:
        # The checkpoint's file name only: users never see server paths.
        info = {**info, "path": Path(info.get("path", "")).name}
        if kind == "resumed":
            lease.event(
                "resumed",
                f"Resumed from the checkpoint at epoch {info['epoch'] + 1}, batch {info['batch']} "
                f"(step {info['step']}).",
                **info,
            )
        elif kind == "checkpoint":
            where = (
                f"end of epoch {info['epoch']}"
                if info["reason"] == "epoch"
                else f"timed, epoch {info['epoch'] + 1}"
            )
            lease.event("checkpoint", f"Checkpoint saved at step {info['step']} ({where}).", **info)

    result = train(
        cfg,
        loaders["train"],
        loaders.get("val"),
        device=device,
        on_progress=lease.on_progress,
        on_epoch_end=on_epoch_end,
        should_stop=lease.should_stop,
        checkpoint_dir=spec["checkpoint_dir"],
        resume_from="auto",
        on_event=on_event,
    )
    if result.patch_coverage is not None:
        lease.last_coverage = result.patch_coverage
        lease.beat(**_coverage_values(lease))
    artifacts = service.current_artifacts(settings, task_id)
    if lease.lost:
        return TaskStatus.FAILED, None, artifacts
    if result.status == "cancelled":
        return TaskStatus.CANCELLED, None, artifacts
    if result.status != "succeeded":
        raise EngineError(f"training ended early ({result.status})")
    held_out = "test" if "test" in loaders else "val" if "val" in loaders else None
    final: dict[str, Any] = {}
    if held_out is not None:
        lease.beat(phase="final evaluation")
        final = evaluate(result.model, loaders[held_out], cfg, device) or {}
        final["split"] = held_out
    final["classes"] = list(index.classes)
    try:
        exported = export_all(result.model, cfg, task_folder / "exports", formats=("safetensors",))
        artifacts["exports"] = {
            fmt: str(Path(path).relative_to(settings.data_dir)) for fmt, path in exported["paths"].items()
        }
    except EngineError as exc:  # the model trained; an export problem is reported, not fatal
        logger.warning("task %s: export failed: %s", task_id, exc)
        artifacts["export_error"] = str(exc)
    return TaskStatus.SUCCEEDED, final, artifacts


def _coverage_values(lease: _Lease) -> dict[str, Any]:
    return {"patch_coverage": lease.coverage(lease.last_coverage)} if lease.last_coverage is not None else {}


def device_memory_bytes(device: Any) -> int:
    """The memory of the device a run trains on: the GPU's, or the machine's RAM on CPU."""
    import psutil
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


@celery_app.task(name=TRAINING_TRAIN)
def train_task(task_id: int) -> str:
    """Train task ``task_id`` (the row says what); a duplicate message finds it claimed and does nothing."""
    return run_task(get_settings(), int(task_id))


@celery_app.task(name=TRAINING_REAP)
def reap_tasks() -> dict[str, list[int]]:
    """Requeue running tasks whose worker stopped sending heartbeats (Celery beat)."""
    from backend.db import session_scope
    from backend.training import service

    settings = get_settings()
    with session_scope(settings) as session:
        outcome = service.reap(session, settings)
    if outcome["requeued"] or outcome["failed"]:
        logger.warning("reaper: %s", outcome)
    return outcome


@celery_app.task(name=TRAINING_REDISPATCH)
def redispatch_tasks() -> list[int]:
    """Send again the tasks left queued too long, and the predictions and evaluations; fail the
    ones whose worker died (Celery beat)."""
    from backend.db import session_scope
    from backend.training import predictions, service

    settings = get_settings()
    with session_scope(settings) as session:
        sent = service.redispatch(session, settings)
    if sent:
        logger.info("re-dispatched tasks %s", sent)
    with session_scope(settings) as session:
        jobs = predictions.keep_jobs_moving(session, settings)
    if jobs["resent"] or jobs["failed"]:
        logger.warning("predictions and evaluations: %s", jobs)
    return sent


def export_model(settings, task_id: int, fmt: str) -> str:  # noqa: ANN001 (Settings)
    """Export the finished task's model in ``fmt`` next to its safetensors export; record the result."""
    from backend.training import service
    from worker.patchgd import export_all, load_model
    from worker.patchgd.errors import EngineError

    folder = service.task_dir(settings, task_id)
    exports = folder / service.EXPORTS_DIR
    source = exports if (exports / "config.json").is_file() else folder / service.CHECKPOINTS_DIR
    try:
        model, cfg = load_model(source)
        written = export_all(model, cfg, exports, formats=(fmt,))
    except EngineError as exc:
        logger.info("task %s: %s export failed: %s", task_id, fmt, exc)
        service.record_export(settings, task_id, fmt, path=None, error=str(exc))
        return "failed"
    service.record_export(settings, task_id, fmt, path=Path(written["paths"][fmt]))
    return "exported"


@celery_app.task(name=TRAINING_EXPORT)
def export_task_model(task_id: int, fmt: str) -> str:
    """Export task ``task_id``'s model as ``fmt`` (``torchscript`` or ``onnx``) for download."""
    return export_model(get_settings(), int(task_id), str(fmt))
