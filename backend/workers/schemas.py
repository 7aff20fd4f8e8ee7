"""Worker processes and queue lengths as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class WorkerJob(BaseModel):
    """What a worker process runs. ``task_id`` and ``task_name`` are set only for a training task
    of yours (or any, for an admin); another user's reads ``job: "task"``, ``label: "a task"``."""

    job: str
    label: str
    task_id: int | None = None
    task_name: str | None = None


class WorkerRead(BaseModel):
    """One job-running worker process. ``device`` is ``{"kind": "cuda", "name", "memory_bytes",
    "count"}`` or ``{"kind": "cpu", "cores", "memory_bytes"}``; ``online`` is false once its
    heartbeat stopped for a few intervals (the row is pruned later)."""

    id: int
    node: str
    hostname: str
    pid: int
    queues: list[str]
    device: dict[str, Any]
    device_text: str
    online: bool
    running: WorkerJob | None
    started_at: datetime
    last_seen: datetime


class QueueLengths(BaseModel):
    """Training tasks queued and running (from the database), and the messages waiting in each
    broker queue (``broker``: null when the broker did not answer within its short timeout)."""

    tasks_queued: int
    tasks_running: int
    broker: dict[str, int] | None


class WorkersRead(BaseModel):
    """The workers page's data."""

    workers: list[WorkerRead]
    queues: QueueLengths
