"""Worker processes: one row per Celery process that runs jobs, kept fresh by its own heartbeat.

Each process that runs jobs (a prefork pool child, or a solo worker's main process) inserts its row
when it starts, updates ``last_seen`` (and what it runs) every few seconds from a background
thread, and deletes the row when it stops cleanly. A row whose beat stopped (the process was
killed) is shown offline and pruned later by the other workers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow

#: Width of the host and Celery node names kept.
WORKER_HOST_MAX_LENGTH = 255
#: Width of a job (Celery task) name kept.
WORKER_JOB_MAX_LENGTH = 100


class Worker(Base):
    """One job-running worker process: where it runs, what it reads and runs, when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The Celery node (``tessera-training@host``) the process belongs to.
    node: Mapped[str] = mapped_column(String(WORKER_HOST_MAX_LENGTH), default="")
    hostname: Mapped[str] = mapped_column(String(WORKER_HOST_MAX_LENGTH))
    pid: Mapped[int] = mapped_column(Integer)
    #: The queues the process consumes.
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: ``{"kind": "cuda", "name", "memory_bytes", "count"}`` or ``{"kind": "cpu", "cores", "memory_bytes"}``.
    device: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The job it runs now (a Celery task name such as ``training.train``), empty when idle.
    current_job: Mapped[str] = mapped_column(String(WORKER_JOB_MAX_LENGTH), default="")
    #: The training task the job works on (``training.train``, ``training.export``), if any. No
    #: foreign key: a task deleted while its row still names it must not block either side.
    current_task_id: Mapped[int | None] = mapped_column(Integer, default=None)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
