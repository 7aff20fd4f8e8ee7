"""Worker processes as the platform sees them.

The worker's side (:func:`register`, :func:`beat`, :func:`unregister`) runs in each job-running
Celery process, from ``worker/presence.py``, in short transactions of its own. The viewer's side
(:func:`list_workers`, :func:`queue_counts`) serves the workers page and ``GET /api/v1/workers``:
a process whose last beat is older than ``worker_offline_after_beats`` intervals is offline; the
job it runs is named (training task id and name) only to the task's owner and to admins.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db import end_transaction, session_scope
from backend.models import Task, TaskStatus, User, Worker
from backend.models.base import utcnow
from backend.models.worker import WORKER_HOST_MAX_LENGTH, WORKER_JOB_MAX_LENGTH

#: Plain words for the jobs a worker runs (Celery task names); others are shown by name.
JOB_LABELS = {
    "training.train": "training",
    "training.export": "exporting a model",
    "memory.plan": "planning memory",
    "datasets.validate": "validating a dataset",
    "datasets.demo": "building a demo dataset",
    "backbones.validate": "checking uploaded weights",
    "backbones.measure": "measuring a backbone",
}


# --------------------------------------------------------------------------- the worker's side


def register(
    settings: Settings, *, node: str, hostname: str, pid: int, queues: list[str], device: dict[str, Any]
) -> int:
    """Insert this process's row (a stale row of an earlier process with the same host and pid is
    replaced); returns its id."""
    now = utcnow()
    with session_scope(settings) as session:
        session.execute(
            delete(Worker).where(Worker.hostname == hostname[:WORKER_HOST_MAX_LENGTH], Worker.pid == pid)
        )
        row = Worker(
            node=node[:WORKER_HOST_MAX_LENGTH],
            hostname=hostname[:WORKER_HOST_MAX_LENGTH],
            pid=pid,
            queues=list(queues),
            device=device,
            current_job="",
            current_task_id=None,
            started_at=now,
            last_seen=now,
        )
        session.add(row)
        session.flush()
        return row.id


def beat(settings: Settings, worker_id: int, *, job: str, task_id: int | None) -> bool:
    """Mark the process seen now, running ``job`` (``""`` when idle) on ``task_id``; False when its
    row is gone (pruned while the process was stopped in a debugger, say): register again."""
    with session_scope(settings) as session:
        found = session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(last_seen=utcnow(), current_job=job[:WORKER_JOB_MAX_LENGTH], current_task_id=task_id)
        ).rowcount  # type: ignore[attr-defined]
    return bool(found)


def unregister(settings: Settings, worker_id: int) -> None:
    """Delete the process's row (it is stopping cleanly)."""
    with session_scope(settings) as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))


def prune(settings: Settings, now: datetime | None = None) -> int:
    """Delete the rows of processes silent for ``worker_prune_after_seconds``; returns how many."""
    cutoff = (now or utcnow()) - timedelta(seconds=settings.worker_prune_after_seconds)
    with session_scope(settings) as session:
        return session.execute(delete(Worker).where(Worker.last_seen < cutoff)).rowcount  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the viewer's side


@dataclass(frozen=True)
class Running:
    """What a worker process runs, as one viewer may see it."""

    job: str
    label: str
    task_id: int | None = None
    task_name: str | None = None


def offline_after(settings: Settings) -> timedelta:
    """A process silent for this long is offline."""
    return timedelta(seconds=settings.worker_heartbeat_seconds * settings.worker_offline_after_beats)


def describe_job(session: Session, viewer: User, job: str, task_id: int | None) -> Running | None:
    """What ``job`` is, in words; a training task is named only to its owner and to admins,
    anyone else reads "a task"."""
    if not job:
        return None
    label = JOB_LABELS.get(job, job)
    if task_id is None:
        return Running(job=job, label=label)
    task = session.get(Task, task_id)
    if task is not None and (viewer.is_admin or task.owner_id == viewer.id):
        return Running(job=job, label=label, task_id=task.id, task_name=task.name)
    return Running(job="task", label="a task")


def list_workers(session: Session, settings: Settings, viewer: User) -> list[dict[str, Any]]:
    """Every known worker process, newest first: online ones, then offline ones (not pruned yet)."""
    now = utcnow()
    limit = offline_after(settings)
    rows = session.scalars(select(Worker).order_by(Worker.node, Worker.started_at, Worker.id)).all()
    result = []
    for row in rows:
        online = now - row.last_seen <= limit
        result.append(
            {
                "id": row.id,
                "node": row.node,
                "hostname": row.hostname,
                "pid": row.pid,
                "queues": list(row.queues or []),
                "device": dict(row.device or {}),
                "online": online,
                "running": describe_job(session, viewer, row.current_job, row.current_task_id)
                if online
                else None,
                "started_at": row.started_at,
                "last_seen": row.last_seen,
            }
        )
    result.sort(key=lambda w: not w["online"])
    return result


def queue_counts(session: Session) -> dict[str, int]:
    """Training tasks queued and running, from the database (the truth, whatever the broker holds)."""
    counts = dict(
        session.execute(
            select(Task.status, func.count())
            .where(Task.status.in_([TaskStatus.QUEUED, TaskStatus.RUNNING]))
            .group_by(Task.status)
        ).all()
    )
    return {
        "queued": int(counts.get(TaskStatus.QUEUED, 0)),
        "running": int(counts.get(TaskStatus.RUNNING, 0)),
    }


def device_words(device: dict[str, Any]) -> str:
    """A device in words: "NVIDIA H200, 139.8 GiB" or "CPU, 16 cores, 125.7 GiB RAM"."""
    gib = (device.get("memory_bytes") or 0) / (1 << 30)
    if device.get("kind") == "cuda":
        count = int(device.get("count") or 1)
        prefix = f"{count} × " if count > 1 else ""
        return f"{prefix}{device.get('name', 'GPU')}, {gib:.1f} GiB"
    if device.get("kind") == "cpu":
        return f"CPU, {device.get('cores', '?')} cores, {gib:.1f} GiB RAM"
    return "unknown"


def overview(session: Session, settings: Settings, viewer: User) -> dict[str, Any]:
    """What the workers page and ``GET /api/v1/workers`` show: the processes and the queue lengths.

    The broker is asked through :func:`backend.queue.broker_queue_lengths_cached` (one probe at a
    time, cached two seconds, waited for at most about ``health_broker_timeout_seconds``), so a
    hung broker never freezes the page. The database's transaction is ended before that wait.
    """
    from backend.queue import broker_queue_lengths_cached

    workers = list_workers(session, settings, viewer)
    for worker in workers:
        worker["device_text"] = device_words(worker["device"])
        running = worker["running"]
        worker["running"] = None if running is None else running.__dict__
    counts = queue_counts(session)
    end_transaction(session)  # nothing was written; no connection is held while the broker is asked
    broker = broker_queue_lengths_cached(settings, settings.health_broker_timeout_seconds)
    return {
        "workers": workers,
        "queues": {"tasks_queued": counts["queued"], "tasks_running": counts["running"], "broker": broker},
    }
