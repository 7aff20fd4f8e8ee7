"""Training tasks: creating them (hyperparameters checked by the engine's own torch-free rules),
listing, cancelling, retrying, cloning and deleting them, and the worker's side of a run: the
claim, the lease, progress, per-epoch metrics and the outcome; plus the reaper and re-dispatcher.

Everything a task owns on disk lives under ``<data_dir>/tasks/<id>/`` (``checkpoints/``,
``exports/``); deleting the task removes that folder after the commit.

State changes that race with a worker are conditional UPDATEs (``WHERE status = ...``): the claim
(queued → running), a cancel of a queued task, the reaper's requeue and every write of the lease
holder (``WHERE worker_id = <mine> AND status = running``), so a worker that lost its lease can
never overwrite the row of the worker that took over. Services only ``flush()``; the worker's
progress and heartbeat writes use short transactions of their own, like the datasets worker's.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, bindparam, case, delete, func, select, update
from sqlalchemy.orm import Session, defer

from backend.config import Settings
from backend.datasets.service import REPORT_FILE, dataset_dir, dataset_levels
from backend.db import run_after_commit, session_scope
from backend.errors import AppError, Conflict, Invalid, NotFound
from backend.models import (
    TASK_EVENTS_KEPT,
    TASK_NAME_MAX_LENGTH,
    TERMINAL_STATUSES,
    Backbone,
    BackboneStatus,
    Dataset,
    DatasetStatus,
    Task,
    TaskEvent,
    TaskMetric,
    TaskStatus,
    User,
)
from backend.models.base import utcnow
from backend.queue import MEMORY_PLAN, TRAINING_EXPORT, TRAINING_TRAIN, enqueue_after_commit
from backend.training import plans
from worker.patchgd.config import ALGORITHMS, IN_MEMORY_MAX_PIXELS, config_from_dict
from worker.patchgd.errors import ConfigError

TASKS_DIR = "tasks"
#: The terminal statuses by name (what pages and tests compare with).
TERMINAL_NAMES = frozenset(status.value for status in TERMINAL_STATUSES)
CHECKPOINTS_DIR = "checkpoints"
EXPORTS_DIR = "exports"
#: Subfolder of the data dir where the ``memory.plan`` job writes its reports (one per token).
PLAN_DIR = "memory_plans"
#: Model formats a finished task can be downloaded in (safetensors is written when the run ends;
#: the others are made by a worker on the first request and kept).
EXPORT_FORMATS = ("safetensors", "torchscript", "onnx")
#: Media type of each download.
EXPORT_MEDIA_TYPES = {
    "safetensors": "application/octet-stream",
    "torchscript": "application/octet-stream",
    "onnx": "application/octet-stream",
}
#: An export requested this long ago without a result is requested again (its worker may have died).
EXPORT_RETRY_AFTER = timedelta(minutes=10)
#: Hyperparameters the platform fills in itself: the dataset decides the classes, the backbone row
#: the architecture and the weights file (a user never names a server path).
PLATFORM_FIELDS = ("num_classes", "backbone", "pretrained_weights")


class HyperparametersInvalid(AppError):
    """A hyperparameter is not acceptable; ``detail`` lists ``{field, message}`` per problem."""

    status_code = 422
    code = "validation_error"
    default_detail = "The hyperparameters are not valid."


def task_dir(settings: Settings, task_id: int) -> Path:
    """The folder of everything task ``task_id`` owns."""
    return settings.data_dir / TASKS_DIR / str(int(task_id))


def checkpoint_dir(settings: Settings, task_id: int) -> Path:
    """Where the engine writes the task's checkpoints (``last.pt``, ``previous.pt``)."""
    return task_dir(settings, task_id) / CHECKPOINTS_DIR


def clean_name(name: str) -> str:
    """The name with runs of whitespace collapsed, or :class:`Invalid` saying what to fix."""
    name = " ".join((name or "").split())
    if not name:
        raise Invalid("Give the task a name.")
    if len(name) > TASK_NAME_MAX_LENGTH:
        raise Invalid(f"The name is longer than {TASK_NAME_MAX_LENGTH} characters.")
    return name


def algorithm_fields(algorithm: str) -> list[str]:
    """The hyperparameter names of ``algorithm`` a user may set (platform-filled ones left out)."""
    return [f.name for f in fields(ALGORITHMS[algorithm]) if f.name not in PLATFORM_FIELDS]


def _field_of(message: str, names: Sequence[str]) -> str:
    """The hyperparameter an engine message is about (they start with, or name, the field)."""
    first = message.split(" ", 1)[0]
    if first in names:
        return first
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name)}\b", message):
            return name
    return ""


def validate_hyperparameters(
    settings: Settings, algorithm: str, given: dict[str, Any], num_classes: int, architecture: str
) -> dict[str, Any]:
    """The full engine config of a task as a dict (engine defaults for what is not given).

    Raises :class:`HyperparametersInvalid` with one ``{field, message}`` per problem found:
    unknown or platform-filled names first, then the engine's own check of the values.
    """
    if algorithm not in ALGORITHMS:
        raise HyperparametersInvalid(
            [{"field": "algorithm", "message": f"choose one of {', '.join(ALGORITHMS)}, not {algorithm!r}"}]
        )
    if not isinstance(given, dict):
        raise HyperparametersInvalid([{"field": "", "message": "hyperparameters must be a JSON object"}])
    allowed = algorithm_fields(algorithm)
    problems = []
    for name in sorted(given):
        if name in PLATFORM_FIELDS:
            problems.append(
                {"field": name, "message": f"{name} is set by the platform (from the dataset or backbone)"}
            )
        elif name not in allowed:
            problems.append({"field": name, "message": f"unknown hyperparameter for {algorithm}"})
    if problems:
        raise HyperparametersInvalid(problems)
    data = dict(given)
    data.setdefault("checkpoint_every_minutes", settings.task_checkpoint_every_minutes)
    data.update(num_classes=num_classes, backbone=architecture)
    try:
        cfg = config_from_dict(algorithm, data)
    except ConfigError as exc:
        message = str(exc)
        raise HyperparametersInvalid([{"field": _field_of(message, allowed), "message": message}]) from exc
    result = cfg.to_dict()
    result.pop("pretrained_weights", None)
    return result


def with_pyramid_level(hyperparameters: dict[str, Any], pyramid_level: int | None) -> dict[str, Any]:
    """The hyperparameters with the request's top-level ``pyramid_level`` in them (it may also be
    given among them; both at once must agree)."""
    if pyramid_level is None or not isinstance(hyperparameters, dict):
        return hyperparameters
    given = hyperparameters.get("pyramid_level")
    if given is not None and given != pyramid_level:
        raise HyperparametersInvalid(
            [
                {
                    "field": "pyramid_level",
                    "message": f"pyramid_level is given twice, as {pyramid_level} and in the "
                    f"hyperparameters as {given!r}; give it once",
                }
            ]
        )
    return {**hyperparameters, "pyramid_level": pyramid_level}


def _level_words(entry: dict[str, Any]) -> str:
    width, height = entry.get("width") or [0, 0], entry.get("height") or [0, 0]
    if width[0] == width[1] and height[0] == height[1]:
        return f"{width[1]:,}x{height[1]:,} px"
    return f"up to {width[1]:,}x{height[1]:,} px"


def check_pyramid_level(settings: Settings, dataset: Dataset, level: int | None) -> None:
    """Refuse a ``pyramid_level`` that not every image of ``dataset`` has (a dataset without
    pyramids has level 0 only), or whose largest image is too large to be read whole for training.
    None (not given) is always accepted: training then reads level 0."""
    if level is None:
        return
    table = dataset_levels(settings, dataset)
    count = int(table.get("count") or 1)
    if level >= count:
        if count == 1 and not table.get("differing"):
            message = (
                f"dataset {dataset.name!r} has no pyramid: its images have one level, 0; "
                f"level {level} does not exist"
            )
        elif count == 1:
            message = (
                f"not every image of dataset {dataset.name!r} has a pyramid (some have one level), "
                f"so only level 0 can be chosen, not {level}"
            )
        else:
            differing = (
                f" (some of its images have up to {table.get('most')} levels, but every image must have it)"
                if table.get("differing")
                else ""
            )
            message = (
                f"level {level} does not exist in dataset {dataset.name!r}: "
                f"choose 0 to {count - 1}{differing}"
            )
        raise HyperparametersInvalid([{"field": "pyramid_level", "message": message}])
    entry = table["levels"][level]
    if int(entry.get("max_pixels") or 0) > IN_MEMORY_MAX_PIXELS:
        readable = [
            e["level"] for e in table["levels"] if int(e.get("max_pixels") or 0) <= IN_MEMORY_MAX_PIXELS
        ]
        hint = f"; choose level {readable[0]} or higher" if readable else ""
        raise HyperparametersInvalid(
            [
                {
                    "field": "pyramid_level",
                    "message": f"level {level} ({_level_words(entry)}) has more than the "
                    f"{IN_MEMORY_MAX_PIXELS:,} pixels a training image may have when read whole{hint}",
                }
            ]
        )


def ready_dataset(session: Session, user: User, dataset_id: int, *, use: str = "trained on") -> Dataset:
    """The user's dataset ``dataset_id`` if it is ready: 404 for anyone else's (or one being
    deleted), 409 naming its status otherwise (``use`` completes "only a ready dataset can be …")."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner_id != user.id or dataset.delete_requested:
        raise NotFound("No such dataset.")
    if dataset.status != DatasetStatus.READY:
        raise Conflict(
            f"Dataset {dataset.name!r} is {dataset.status.value}: only a ready dataset can be {use}."
        )
    return dataset


def _ready_backbone(session: Session, user: User, backbone_id: int) -> Backbone:
    backbone = session.get(Backbone, backbone_id)
    if backbone is None or (backbone.owner_id is not None and backbone.owner_id != user.id):
        raise NotFound("There is no backbone with this id.")
    if backbone.status != BackboneStatus.READY:
        raise Conflict(
            f"Backbone {backbone.name!r} is {backbone.status.value}: only a ready one can be used."
        )
    return backbone


def create_task(
    session: Session,
    settings: Settings,
    user: User,
    *,
    name: str,
    dataset_id: int,
    backbone_id: int,
    algorithm: str,
    hyperparameters: dict[str, Any],
    memory_budget_gib: float | None = None,
    plan_token: str | None = None,
    pyramid_level: int | None = None,
) -> Task:
    """Record a queued task and send ``training.train`` after the commit. With ``plan_token`` the
    task keeps that plan (of its algorithm) as ``task.plan``, and the plan's budget when none is given.
    ``pyramid_level`` (also accepted among the hyperparameters, where it is kept) must be a level
    every image of the dataset has (:func:`check_pyramid_level`)."""
    name = clean_name(name)
    dataset = ready_dataset(session, user, dataset_id)
    backbone = _ready_backbone(session, user, backbone_id)
    num_classes = int(dataset.num_classes or len((dataset.summary or {}).get("classes", [])))
    config = validate_hyperparameters(
        settings,
        algorithm,
        with_pyramid_level(hyperparameters, pyramid_level),
        num_classes,
        backbone.architecture,
    )
    check_pyramid_level(settings, dataset, config.get("pyramid_level"))
    plan: dict[str, Any] = {}
    if plan_token:
        plan = accepted_plan(settings, user, plan_token, algorithm, config)
        if memory_budget_gib is None:
            memory_budget_gib = plan.get("budget_gib")
    task = Task(
        owner_id=user.id,
        name=name,
        dataset_id=dataset.id,
        backbone_id=backbone.id,
        algorithm=algorithm,
        hyperparameters=config,
        memory_budget_gib=memory_budget_gib,
        status=TaskStatus.QUEUED,
        attempts=0,
        max_attempts=settings.task_max_attempts,
        plan=plan,
        final_metrics={},
        artifacts={},
        dispatched_at=utcnow(),
    )
    session.add(task)
    session.flush()
    task.artifacts = {"checkpoint_dir": str(checkpoint_dir(settings, task.id).relative_to(settings.data_dir))}
    session.flush()
    enqueue_after_commit(session, settings, TRAINING_TRAIN, task.id)
    return task


def list_tasks(session: Session, user: User) -> Sequence[Task]:
    """The user's tasks, newest first."""
    return session.scalars(
        select(Task)
        .where(Task.owner_id == user.id)
        .options(defer(Task.patch_coverage))  # the list never shows it; it is the row's largest value
        .order_by(Task.created_at.desc(), Task.id.desc())
    ).all()


# The statements of the polled reads (a task page polls its status every few seconds; API clients
# poll the task) are built once: building one costs the web process more CPU than running it.
_TASK_BY_ID = select(Task).where(Task.id == bindparam("task_id"))
_QUEUED_TASK_IDS = select(Task.id).where(Task.status == TaskStatus.QUEUED).order_by(Task.id)
_METRICS_AFTER = (
    select(TaskMetric)
    .where(TaskMetric.task_id == bindparam("task_id"), TaskMetric.epoch > bindparam("after"))
    .order_by(TaskMetric.epoch)
)
_EVENTS_AFTER = (
    select(TaskEvent)
    .where(TaskEvent.task_id == bindparam("task_id"), TaskEvent.id > bindparam("after"))
    .order_by(TaskEvent.id.desc())
    .limit(bindparam("limit", type_=Integer))
)


def get_task(session: Session, user: User, task_id: int) -> Task:
    """The user's task ``task_id``; 404 for anyone else's (never say which)."""
    task = session.scalar(_TASK_BY_ID, {"task_id": task_id})
    if task is None or task.owner_id != user.id:
        raise NotFound("No such task.")
    return task


def queue_positions(session: Session) -> dict[int, int]:
    """Position (1 = next) of every queued task in the shared queue, oldest first."""
    ids = session.scalars(_QUEUED_TASK_IDS).all()
    return {task_id: position for position, task_id in enumerate(ids, start=1)}


def list_metrics(session: Session, task: Task, *, after: int = -1) -> Sequence[TaskMetric]:
    """The task's per-epoch metrics (those after epoch ``after``, 0-based), in epoch order."""
    return session.scalars(_METRICS_AFTER, {"task_id": task.id, "after": after}).all()


def best_metrics(
    session: Session, task: Task, metrics: Sequence[TaskMetric] | None = None
) -> dict[str, Any] | None:
    """The epoch with the highest validation accuracy (ties: the earliest), if any was evaluated
    (``metrics``: the task's rows when the caller has them already)."""
    if metrics is None:
        metrics = list_metrics(session, task)
    rows = [m for m in metrics if m.val_accuracy is not None]
    if not rows:
        return None
    best = max(rows, key=lambda m: (m.val_accuracy, -m.epoch))
    return {
        "epoch": best.epoch,
        "val_accuracy": best.val_accuracy,
        "val_qwk": best.val_qwk,
        "val_loss": best.val_loss,
    }


def cancel_task(session: Session, user: User, task_id: int) -> Task:
    """Cancel a queued task now, or ask the worker running it to stop (it ends ``cancelled``)."""
    task = get_task(session, user, task_id)
    now = utcnow()
    done = session.execute(
        update(Task)
        .where(Task.id == task.id, Task.status == TaskStatus.QUEUED)
        .values(status=TaskStatus.CANCELLED, finished_at=now, phase="cancelled", updated_at=now)
    ).rowcount  # type: ignore[attr-defined]
    if not done:
        done = session.execute(
            update(Task)
            .where(Task.id == task.id, Task.status == TaskStatus.RUNNING)
            .values(cancel_requested=True, updated_at=now)
        ).rowcount  # type: ignore[attr-defined]
    session.refresh(task)
    if not done:
        raise Conflict(f"Task {task.name!r} has already ended ({task.status.value}).")
    if task.status == TaskStatus.CANCELLED:
        add_event(session, task.id, "finished", "Cancelled while queued.", attempt=task.attempts)
    else:
        add_event(
            session,
            task.id,
            "cancel_requested",
            "Cancel requested; the worker stops at its next step.",
            attempt=task.attempts,
        )
    return task


def retry_task(session: Session, settings: Settings, user: User, task_id: int) -> Task:
    """Queue a failed or cancelled task again; the worker resumes from its last checkpoint."""
    task = get_task(session, user, task_id)
    now = utcnow()
    done = session.execute(
        update(Task)
        .where(Task.id == task.id, Task.status.in_([TaskStatus.FAILED, TaskStatus.CANCELLED]))
        .values(
            status=TaskStatus.QUEUED,
            attempts=0,
            max_attempts=settings.task_max_attempts,
            cancel_requested=False,
            error="",
            phase="queued",
            worker_id="",
            lease_expires_at=None,
            finished_at=None,
            dispatched_at=now,
            updated_at=now,
        )
    ).rowcount  # type: ignore[attr-defined]
    session.refresh(task)
    if not done:
        hint = " Clone it to train it again." if task.status == TaskStatus.SUCCEEDED else ""
        raise Conflict(
            f"Only a failed or cancelled task can be retried; {task.name!r} is {task.status.value}.{hint}"
        )
    add_event(session, task.id, "queued", "Queued again (retry); it resumes from its last checkpoint.")
    enqueue_after_commit(session, settings, TRAINING_TRAIN, task.id)
    return task


def clone_task(
    session: Session, settings: Settings, user: User, task_id: int, algorithm: str | None = None
) -> Task:
    """A new queued task with the same dataset, backbone and settings (optionally as the other
    algorithm: the hyperparameters both share are kept, the others take the engine defaults)."""
    source = get_task(session, user, task_id)
    target = algorithm or source.algorithm
    if target not in ALGORITHMS:
        raise HyperparametersInvalid(
            [{"field": "algorithm", "message": f"choose one of {', '.join(ALGORITHMS)}, not {target!r}"}]
        )
    allowed = set(algorithm_fields(target))
    given = {k: v for k, v in (source.hyperparameters or {}).items() if k in allowed}
    suffix = " (copy)" if target == source.algorithm else f" ({target})"
    name = source.name[: TASK_NAME_MAX_LENGTH - len(suffix)] + suffix
    return create_task(
        session,
        settings,
        user,
        name=name,
        dataset_id=source.dataset_id,
        backbone_id=source.backbone_id,
        algorithm=target,
        hyperparameters=given,
        memory_budget_gib=source.memory_budget_gib,
    )


def delete_task(session: Session, settings: Settings, user: User, task_id: int) -> None:
    """Delete a task that is not running, its metrics and (after the commit) its files."""
    task = get_task(session, user, task_id)
    session.execute(delete(TaskMetric).where(TaskMetric.task_id == task.id))
    session.execute(delete(TaskEvent).where(TaskEvent.task_id == task.id))
    gone = session.execute(delete(Task).where(Task.id == task.id, Task.status != TaskStatus.RUNNING)).rowcount  # type: ignore[attr-defined]
    if not gone:
        raise Conflict(f"Task {task.name!r} is running: cancel it first, then delete it.")
    session.expunge(task)
    folder = task_dir(settings, task_id)
    run_after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def tasks_using_dataset(session: Session, dataset_id: int) -> int:
    """How many tasks train on dataset ``dataset_id``."""
    return int(session.scalar(select(func.count(Task.id)).where(Task.dataset_id == dataset_id)) or 0)


# The worker's side: claim, lease, progress, metrics, outcome.


def add_event(
    session: Session,
    task_id: int,
    kind: str,
    message: str,
    *,
    attempt: int = 0,
    worker_id: str = "",
    data: dict[str, Any] | None = None,
    keep: int = TASK_EVENTS_KEPT,
) -> None:
    """Append one line to the task's log in ``session``'s transaction; the oldest lines past the
    newest ``keep`` are deleted (one indexed range delete on ``(task_id, id)``)."""
    session.add(
        TaskEvent(
            task_id=task_id,
            kind=kind[:32],
            message=message[:4000],
            attempt=attempt,
            worker_id=worker_id[:200],
            data=data or {},
            created_at=utcnow(),
        )
    )
    session.flush()
    cutoff = session.scalar(
        select(TaskEvent.id)
        .where(TaskEvent.task_id == task_id)
        .order_by(TaskEvent.id.desc())
        .offset(keep)
        .limit(1)
    )
    if cutoff is not None:
        session.execute(
            delete(TaskEvent)
            .where(TaskEvent.task_id == task_id, TaskEvent.id <= cutoff)
            .execution_options(synchronize_session=False)
        )


def record_event(
    settings: Settings,
    task_id: int,
    kind: str,
    message: str,
    *,
    worker_id: str = "",
    data: dict[str, Any] | None = None,
) -> None:
    """The worker's side of :func:`add_event`: one short transaction of its own (the attempt is
    the row's)."""
    with session_scope(settings) as session:
        attempt = int(session.scalar(select(Task.attempts).where(Task.id == task_id)) or 0)
        add_event(session, task_id, kind, message, attempt=attempt, worker_id=worker_id, data=data)


def list_events(
    session: Session, task: Task, *, after: int = 0, limit: int = TASK_EVENTS_KEPT
) -> list[TaskEvent]:
    """The task's events with an id above ``after``: the newest ``limit`` of them, oldest first."""
    rows = session.scalars(_EVENTS_AFTER, {"task_id": task.id, "after": after, "limit": limit}).all()
    return list(reversed(rows))


def coverage_view(task: Task) -> dict[str, Any] | None:
    """The task's patch coverage as the API and page show it, or None (baseline, or nothing yet):
    ``n``, ``counts`` (n×n, row-major), ``sampled`` (their sum), ``min``, ``max``."""
    data = task.patch_coverage or {}
    counts = data.get("counts") or []
    n = int(data.get("n") or 0)
    if not n or len(counts) != n * n:
        return None
    return {
        "n": n,
        "counts": [int(c) for c in counts],
        "sampled": int(sum(counts)),
        "min": int(min(counts)),
        "max": int(max(counts)),
    }


def _lease_until(settings: Settings, now: datetime) -> datetime:
    return now + timedelta(seconds=settings.task_lease_seconds)


def _running_of(session: Session, owner_id: int) -> int:
    return int(
        session.scalar(
            select(func.count(Task.id)).where(Task.owner_id == owner_id, Task.status == TaskStatus.RUNNING)
        )
        or 0
    )


def claim(session: Session, settings: Settings, task_id: int, worker_id: str) -> str:
    """Take a queued task for ``worker_id``: ``"claimed"``, ``"waiting"`` (its owner already runs
    ``max_running_tasks_per_user`` tasks; it stays queued) or ``"skipped"`` (gone, not queued).

    One conditional UPDATE (``WHERE status = 'queued'`` and fewer running tasks of the owner than
    the limit, counted in the same statement), so a duplicate message never runs a task twice.
    On Postgres the owner's row is locked first, so that two workers claiming two tasks of one
    owner at once count each other (the UPDATE's snapshot is taken after the lock); SQLite runs
    one writing statement at a time anyway.
    """
    owner_id = session.scalar(select(Task.owner_id).where(Task.id == task_id))
    if owner_id is None:
        return "skipped"
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())
    running = (
        select(func.count(Task.id))
        .where(Task.owner_id == owner_id, Task.status == TaskStatus.RUNNING)
        .scalar_subquery()
    )
    now = utcnow()
    claimed = session.execute(
        update(Task)
        .where(
            Task.id == task_id,
            Task.status == TaskStatus.QUEUED,
            Task.cancel_requested.is_(False),
            running < settings.max_running_tasks_per_user,
        )
        .values(
            status=TaskStatus.RUNNING,
            attempts=Task.attempts + 1,
            worker_id=worker_id[:200],
            heartbeat_at=now,
            lease_expires_at=_lease_until(settings, now),
            started_at=func.coalesce(Task.started_at, now),
            phase="starting",
            error="",
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if claimed == 1:
        attempt = int(session.scalar(select(Task.attempts).where(Task.id == task_id)) or 0)
        add_event(
            session,
            task_id,
            "claimed",
            f"Claimed by worker {worker_id} (attempt {attempt}).",
            attempt=attempt,
            worker_id=worker_id,
        )
        return "claimed"
    state = session.scalar(select(Task.status).where(Task.id == task_id))
    return "waiting" if state == TaskStatus.QUEUED else "skipped"


def _mine(task_id: int, worker_id: str) -> Any:
    return (Task.id == task_id, Task.worker_id == worker_id, Task.status == TaskStatus.RUNNING)


def heartbeat(settings: Settings, task_id: int, worker_id: str, **progress: Any) -> tuple[bool, bool]:
    """Extend the lease (and write ``progress`` fields) in a short transaction of its own.

    Returns ``(still_mine, cancel_requested)``: a worker whose lease was taken over must stop.
    """
    now = utcnow()
    if "peak_memory_bytes" in progress:
        peak = int(progress.pop("peak_memory_bytes") or 0)
        progress["peak_memory_bytes"] = case(
            (Task.peak_memory_bytes < peak, peak), else_=Task.peak_memory_bytes
        )
    with session_scope(settings) as session:
        mine = session.execute(
            update(Task)
            .where(*_mine(task_id, worker_id))
            .values(
                heartbeat_at=now, lease_expires_at=_lease_until(settings, now), updated_at=now, **progress
            )
        ).rowcount  # type: ignore[attr-defined]
        cancel = bool(session.scalar(select(Task.cancel_requested).where(Task.id == task_id)))
    return mine == 1, cancel


def record_epoch(settings: Settings, task_id: int, worker_id: str, metrics: dict[str, Any]) -> bool:
    """Upsert the metrics of one epoch (a resumed run that repeats an epoch replaces its row)."""
    columns = {
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_qwk",
        "lr",
        "lrs",
        "peak_memory_bytes",
        "images_per_s",
        "patches_per_s",
        "seconds",
    }
    values = {k: v for k, v in metrics.items() if k in columns}
    epoch = int(metrics["epoch"])
    with session_scope(settings) as session:
        owner = session.scalar(select(Task.id).where(*_mine(task_id, worker_id)).with_for_update())
        if owner is None:
            return False
        row = session.scalar(
            select(TaskMetric).where(TaskMetric.task_id == task_id, TaskMetric.epoch == epoch)
        )
        if row is None:
            session.add(TaskMetric(task_id=task_id, epoch=epoch, **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)
        peak = int(values.get("peak_memory_bytes") or 0)
        task = session.get(Task, task_id)
        if task is not None and peak > (task.peak_memory_bytes or 0):
            task.peak_memory_bytes = peak
        add_event(
            session,
            task_id,
            "epoch",
            epoch_line(metrics),
            attempt=task.attempts if task is not None else 0,
            worker_id=worker_id,
            data={k: values[k] for k in sorted(values) if k != "lrs"} | {"epoch": epoch},
        )
    return True


def epoch_line(metrics: dict[str, Any]) -> str:
    """The log line of a finished epoch: its losses, validation scores, speed and peak memory."""
    parts = [f"Epoch {int(metrics['epoch']) + 1} done: train loss {metrics['train_loss']:.4f}"]
    if metrics.get("val_loss") is not None:
        parts.append(f"val loss {metrics['val_loss']:.4f}")
    if metrics.get("val_accuracy") is not None:
        parts.append(f"val accuracy {metrics['val_accuracy']:.3f}")
    if metrics.get("val_qwk") is not None:
        parts.append(f"QWK {metrics['val_qwk']:.3f}")
    parts.append(f"{float(metrics.get('images_per_s') or 0):.1f} images/s")
    parts.append(f"peak {int(metrics.get('peak_memory_bytes') or 0) / 2**20:.0f} MiB")
    return ", ".join(parts) + "."


def finish(
    settings: Settings,
    task_id: int,
    worker_id: str,
    status: TaskStatus,
    *,
    error: str = "",
    final_metrics: dict[str, Any] | None = None,
    artifacts: dict[str, Any] | None = None,
) -> bool:
    """Write the outcome, if this worker still holds the task; then send the owner's next queued
    task (one slot was freed). Returns False when the lease had been lost (nothing written)."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "error": error[:4000],
        "finished_at": now,
        "lease_expires_at": None,
        "phase": status.value,
        "eta_seconds": None,
        "updated_at": now,
    }
    if status == TaskStatus.SUCCEEDED:
        values.update(fraction=1.0, step=Task.total_steps, epoch=Task.epoch)
    if final_metrics is not None:
        values["final_metrics"] = final_metrics
    if artifacts is not None:
        values["artifacts"] = artifacts
    with session_scope(settings) as session:
        done = session.execute(update(Task).where(*_mine(task_id, worker_id)).values(**values)).rowcount  # type: ignore[attr-defined]
        if done:
            attempt = int(session.scalar(select(Task.attempts).where(Task.id == task_id)) or 0)
            line = {
                TaskStatus.SUCCEEDED: "Finished: succeeded.",
                TaskStatus.CANCELLED: "Finished: cancelled.",
            }.get(status, f"Finished: {status.value}.")
            if status == TaskStatus.FAILED:
                add_event(session, task_id, "error", error[:4000], attempt=attempt, worker_id=worker_id)
            add_event(session, task_id, "finished", line, attempt=attempt, worker_id=worker_id)
            owner_id = session.scalar(select(Task.owner_id).where(Task.id == task_id))
            _dispatch_waiting(session, settings, owner_id=owner_id)
    return done == 1


def release(settings: Settings, task_id: int, worker_id: str) -> None:
    """Give a claimed task back to the queue (the worker is shutting down); the next claim resumes it."""
    now = utcnow()
    with session_scope(settings) as session:
        released = session.execute(
            update(Task)
            .where(*_mine(task_id, worker_id))
            .values(
                status=TaskStatus.QUEUED,
                worker_id="",
                lease_expires_at=None,
                phase="queued",
                dispatched_at=now,
            )
        ).rowcount  # type: ignore[attr-defined]
        if released:
            add_event(
                session,
                task_id,
                "requeued",
                f"Worker {worker_id} is shutting down; the task is queued again to resume.",
                worker_id=worker_id,
            )


def _dispatch_waiting(
    session: Session, settings: Settings, *, owner_id: int | None = None, older_than: datetime | None = None
) -> list[int]:
    """Send queued tasks that may start now: per owner, the oldest queued tasks that fit in the free
    running slots (those sent more recently than ``older_than`` count as on their way)."""
    query = select(Task).where(Task.status == TaskStatus.QUEUED, Task.cancel_requested.is_(False))
    if owner_id is not None:
        query = query.where(Task.owner_id == owner_id)
    queued = session.scalars(query.order_by(Task.id)).all()
    free: dict[int, int] = {}
    sent = []
    now = utcnow()
    for task in queued:
        if task.owner_id not in free:
            free[task.owner_id] = settings.max_running_tasks_per_user - _running_of(session, task.owner_id)
        if free[task.owner_id] <= 0:
            continue
        free[task.owner_id] -= 1
        if older_than is not None and task.dispatched_at is not None and task.dispatched_at >= older_than:
            continue  # sent recently: its message is on its way
        task.dispatched_at = now
        sent.append(task.id)
        enqueue_after_commit(session, settings, TRAINING_TRAIN, task.id)
    session.flush()
    return sent


def reap(session: Session, settings: Settings, now: datetime | None = None) -> dict[str, list[int]]:
    """Requeue running tasks whose lease expired (their worker died or hangs); a task that used up
    its attempts is failed with the reason instead. Never leaves a task running without a lease."""
    now = now or utcnow()
    expired = session.scalars(
        select(Task).where(Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now).order_by(Task.id)
    ).all()
    requeued, failed = [], []
    for task in expired:
        guard = (Task.id == task.id, Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now)
        if task.attempts >= task.max_attempts:
            reason = (
                f"The worker running this task stopped responding (no heartbeat for "
                f"{settings.task_lease_seconds:g} s) on each of its {task.attempts} attempts; it was "
                "given up. Retry it to resume from its last checkpoint."
            )
            values: dict[str, Any] = dict(
                status=TaskStatus.FAILED, error=reason, finished_at=now, lease_expires_at=None, phase="failed"
            )
            target = failed
        else:
            values = dict(
                status=TaskStatus.QUEUED,
                worker_id="",
                lease_expires_at=None,
                phase="requeued",
                dispatched_at=now,
                error=f"Attempt {task.attempts} lost its worker; resuming from the last checkpoint.",
            )
            target = requeued
        if session.execute(update(Task).where(*guard).values(**values)).rowcount:  # type: ignore[attr-defined]
            target.append(task.id)
            add_event(
                session,
                task.id,
                "lease_lost",
                f"Worker {task.worker_id} stopped sending heartbeats; "
                + ("the task failed: " + values["error"] if target is failed else "requeued to resume."),
                attempt=task.attempts,
                worker_id=task.worker_id,
            )
            if target is requeued:
                enqueue_after_commit(session, settings, TRAINING_TRAIN, task.id)
    session.flush()
    return {"requeued": requeued, "failed": failed}


def redispatch(session: Session, settings: Settings, now: datetime | None = None) -> list[int]:
    """Send again the tasks still queued ``task_redispatch_after_seconds`` after their last message
    (an enqueue that failed, a broker that lost it, an owner's slot that freed up)."""
    now = now or utcnow()
    return _dispatch_waiting(
        session, settings, older_than=now - timedelta(seconds=settings.task_redispatch_after_seconds)
    )


def run_spec(session: Session, settings: Settings, task_id: int) -> dict[str, Any]:
    """What the worker needs to run a claimed task: config, dataset folder and report, weights."""
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound("No such task.")
    dataset = session.get(Dataset, task.dataset_id)
    backbone = session.get(Backbone, task.backbone_id)
    config = dict(task.hyperparameters or {})
    if backbone is not None and backbone.weights_path:
        config["pretrained_weights"] = str(settings.data_dir / backbone.weights_path)
    folder = dataset_dir(settings, dataset.id) if dataset is not None else None
    return {
        "algorithm": task.algorithm,
        "config": config,
        "dataset_dir": str(folder) if folder else "",
        "report_path": str(folder / REPORT_FILE) if folder else "",
        "task_dir": str(task_dir(settings, task.id)),
        "checkpoint_dir": str(checkpoint_dir(settings, task.id)),
        "attempt": task.attempts,
        "memory_budget_gib": task.memory_budget_gib,
    }


def record_memory_setup(settings: Settings, task_id: int, worker_id: str, memory: dict[str, Any]) -> None:
    """Record how the run treats its memory budget (``device``, ``enforced``, ``fraction``) in
    ``artifacts["memory"]``; only the lease holder writes."""
    with session_scope(settings) as session:
        task = session.scalars(select(Task).where(*_mine(task_id, worker_id))).first()
        if task is not None:
            task.artifacts = {**(task.artifacts or {}), "memory": memory}


def note_attempt(
    settings: Settings, task_id: int, worker_id: str, *, first_step: int, memory_total_bytes: int = 0
) -> None:
    """Record where an attempt started (its first training step: a resumed attempt continues the
    step count of the checkpoint it resumed from) and the memory of the device it runs on (what
    the page measures the peak against when the task has no budget), in ``artifacts["attempts"]``."""
    with session_scope(settings) as session:
        task = session.scalar(select(Task).where(*_mine(task_id, worker_id)).with_for_update())
        if task is None:
            return
        artifacts = dict(task.artifacts or {})
        artifacts["attempts"] = [
            *artifacts.get("attempts", []),
            {
                "attempt": task.attempts,
                "first_step": int(first_step),
                "worker": worker_id,
                "memory_total_bytes": int(memory_total_bytes),
            },
        ]
        task.artifacts = artifacts


def current_artifacts(settings: Settings, task_id: int) -> dict[str, Any]:
    """The task's ``artifacts`` as stored (the worker adds its exports before finishing)."""
    with session_scope(settings) as session:
        return dict(session.scalar(select(Task.artifacts).where(Task.id == task_id)) or {})


# Model downloads.


def model_file(session: Session, settings: Settings, user: User, task_id: int, fmt: str) -> Path | None:
    """The file of the task's model in ``fmt``, or None while a worker makes it (requested here,
    after the commit, once per :data:`EXPORT_RETRY_AFTER`). Only a succeeded task has a model."""
    if fmt not in EXPORT_FORMATS:
        raise Invalid(f"Unknown format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    task = get_task(session, user, task_id)
    if task.status != TaskStatus.SUCCEEDED:
        raise Conflict(f"Task {task.name!r} is {task.status.value}: only a succeeded task has a model.")
    artifacts = dict(task.artifacts or {})
    relative = (artifacts.get("exports") or {}).get(fmt)
    if relative:
        path = (settings.data_dir / relative).resolve()
        if path.is_file() and path.is_relative_to(task_dir(settings, task.id).resolve()):
            return path
    error = (artifacts.get("export_errors") or {}).get(fmt)
    if error:
        raise Conflict(f"The {fmt} export failed: {error}")
    requested = (artifacts.get("export_requested") or {}).get(fmt)
    now = utcnow()
    if requested is None or datetime.fromisoformat(requested) < now - EXPORT_RETRY_AFTER:
        artifacts["export_requested"] = {**(artifacts.get("export_requested") or {}), fmt: now.isoformat()}
        task.artifacts = artifacts
        session.flush()
        enqueue_after_commit(session, settings, TRAINING_EXPORT, task.id, fmt)
    return None


def record_export(settings: Settings, task_id: int, fmt: str, *, path: Path | None, error: str = "") -> None:
    """The worker's result of an export: the file (relative to the data dir) or why it failed."""
    with session_scope(settings) as session:
        task = session.scalar(select(Task).where(Task.id == task_id).with_for_update())
        if task is None:
            return
        artifacts = dict(task.artifacts or {})
        if path is not None:
            artifacts["exports"] = {
                **(artifacts.get("exports") or {}),
                fmt: str(path.relative_to(settings.data_dir)),
            }
        else:
            artifacts["export_errors"] = {**(artifacts.get("export_errors") or {}), fmt: error[:2000]}
        task.artifacts = artifacts


# Memory plans: settings that fit a budget, measured on a worker (``memory.plan``).


def request_plan(
    session: Session,
    settings: Settings,
    user: User,
    *,
    dataset_id: int,
    backbone_id: int,
    algorithm: str,
    hyperparameters: dict[str, Any],
    memory_budget_gib: float,
    algorithms: Sequence[str] | None = None,
    verify: bool = False,
    pyramid_level: int | None = None,
) -> str:
    """Check the settings like :func:`create_task`, then ask a worker (light queue) for a plan of
    each of ``algorithms`` (default: ``algorithm`` alone) under the budget; returns the token to
    read it back with (:func:`read_plan`).

    ``hyperparameters`` are ``algorithm``'s; another algorithm is planned with those it shares
    (image size, batch size...), the rest at the engine's defaults, as a clone to it would be.
    Without ``verify`` the calibrated model answers (seconds); with it each choice is also
    measured by a trial on the worker.
    """
    configs = plan_configs(
        session,
        settings,
        user,
        dataset_id=dataset_id,
        backbone_id=backbone_id,
        algorithm=algorithm,
        hyperparameters=with_pyramid_level(hyperparameters, pyramid_level),
        algorithms=algorithms,
    )
    token = f"u{user.id}-{uuid.uuid4().hex}"
    enqueue_after_commit(
        session,
        settings,
        MEMORY_PLAN,
        token,
        configs,
        float(memory_budget_gib),
        False,
        None,
        bool(verify),
        algorithm,
    )
    return token


def plan_configs(
    session: Session,
    settings: Settings,
    user: User,
    *,
    dataset_id: int,
    backbone_id: int,
    algorithm: str,
    hyperparameters: dict[str, Any],
    algorithms: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The engine config of each algorithm to plan (see :func:`request_plan`), checked like a task's."""
    dataset = ready_dataset(session, user, dataset_id)
    backbone = _ready_backbone(session, user, backbone_id)
    num_classes = int(dataset.num_classes or len((dataset.summary or {}).get("classes", [])))
    config = validate_hyperparameters(
        settings, algorithm, hyperparameters, num_classes, backbone.architecture
    )
    # The level decides which pixels are read, not the memory of a step (every image is resized
    # to image_size first): it is checked and planned with, like the other settings.
    check_pyramid_level(settings, dataset, config.get("pyramid_level"))
    configs = {algorithm: config}
    for other in algorithms or ():
        if other not in ALGORITHMS:
            raise HyperparametersInvalid(
                [{"field": "algorithms", "message": f"choose among {', '.join(ALGORITHMS)}, not {other!r}"}]
            )
        if other not in configs:
            shared = {k: v for k, v in hyperparameters.items() if k in set(algorithm_fields(other))}
            configs[other] = validate_hyperparameters(
                settings, other, shared, num_classes, backbone.architecture
            )
    return configs


def read_plan(settings: Settings, user: User, token: str) -> dict[str, Any] | None:
    """The plan requested under ``token`` by ``user`` (None while the worker makes it)."""
    if not re.fullmatch(rf"u{user.id}-[0-9a-f]{{32}}", token):
        raise NotFound("No such plan.")
    path = settings.data_dir / PLAN_DIR / f"{token}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def accepted_plan(
    settings: Settings, user: User, token: str, algorithm: str, config: dict[str, Any]
) -> dict[str, Any]:
    """What a task created with plan ``token`` keeps (``task.plan``): the plan of its algorithm,
    with ``matches`` saying whether the task's settings are still the planned ones. 404 for
    another user's token; 409 while the plan is being made or when that algorithm does not fit."""
    report = read_plan(settings, user, token)
    if report is None:
        raise Conflict("The plan is still being made; wait for it, then create the task.")
    entry = (report.get("algorithms") or {}).get(algorithm)
    if entry is None:
        raise Conflict(f"The plan does not cover {algorithm}; plan it again with this algorithm.")
    if not entry.get("fits"):
        raise Conflict(f"The plan found no {algorithm} settings that fit its budget.")
    kept = plans.plan_for_task(report, algorithm, token)
    planned = {"batch_size": entry.get("batch_size"), "image_size": entry.get("image_size")}
    if algorithm == "patchgd":
        planned["patches_per_step"] = entry.get("patches_per_step")
        cfg = config_from_dict(algorithm, config)
        actual = {"batch_size": cfg.batch_size, "image_size": cfg.image_size, "patches_per_step": cfg.k}
    else:
        actual = {"batch_size": config.get("batch_size"), "image_size": config.get("image_size")}
    kept["matches"] = planned == actual
    return kept
