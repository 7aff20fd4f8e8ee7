"""Training tasks: one run of PatchGD or the baseline on a dataset, and its per-epoch metrics.

The row is the truth: a worker claims it with a conditional UPDATE (queued → running), holds a
lease it keeps extending (``heartbeat_at``, ``lease_expires_at``), and writes progress, per-epoch
metrics and the outcome to it. Everything a task owns on disk (checkpoints, exports) lives under
``<data_dir>/tasks/<id>/``; ``artifacts`` records what is there.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow

#: Longest task name (the column width; schemas and services import it).
TASK_NAME_MAX_LENGTH = 100
#: Longest worker id kept on the lease.
WORKER_ID_MAX_LENGTH = 200


class TaskStatus(enum.StrEnum):
    """queued → running → succeeded | failed | cancelled (a lost running task goes back to queued)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a task never leaves by itself (retry and clone start from them).
TERMINAL_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class Task(Base):
    """One training run: what to train (dataset, backbone, algorithm, hyperparameters), who runs
    it (the lease), how far it is (progress) and what came out (metrics, error, artifacts)."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(TASK_NAME_MAX_LENGTH))
    # No ON DELETE: a dataset or backbone a task uses cannot be deleted (the services refuse).
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    #: "patchgd" or "baseline" (the engine's algorithm names).
    algorithm: Mapped[str] = mapped_column(String(16))
    #: The engine config as validated (``config_from_dict``), without ``pretrained_weights``.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    memory_budget_gib: Mapped[float | None] = mapped_column(Float, default=None)
    status: Mapped[TaskStatus] = mapped_column(
        Enum(
            TaskStatus,
            name="task_status",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=TaskStatus.QUEUED,
        index=True,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # The lease: who runs it and until when (extended by every heartbeat).
    worker_id: Mapped[str] = mapped_column(String(WORKER_ID_MAX_LENGTH), default="")
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Progress (the latest snapshot).
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    images_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    patches_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    phase: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    #: The memory plan made for this task (``memory.plan``'s report), if any.
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    peak_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: PatchGD only: how often each grid cell was sampled for a gradient pass so far,
    #: ``{"n": side, "counts": [n*n ints, row-major], "sampled": sum}`` (``{}`` until the first write).
    patch_coverage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    #: Evaluation of the final model on the held-out split: accuracy, QWK, per-class recall, confusion.
    final_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Files under ``<data_dir>/tasks/<id>/`` (relative to the data dir): checkpoint dir, exports.
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    #: When the last message for it was sent (the re-dispatcher re-sends a task queued too long).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class TaskMetric(Base):
    """The metrics of one finished epoch of a task (one row per epoch: a resume upserts)."""

    __tablename__ = "task_metrics"
    __table_args__ = (UniqueConstraint("task_id", "epoch", name="uq_task_metrics_task_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float, default=None)
    val_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    val_qwk: Mapped[float | None] = mapped_column(Float, default=None)
    lr: Mapped[float] = mapped_column(Float, default=0.0)
    lrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    peak_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    images_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    patches_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


#: Events kept per task (older ones are deleted as new ones arrive).
TASK_EVENTS_KEPT = 500
#: Longest event kind.
TASK_EVENT_KIND_MAX_LENGTH = 32


class TaskEvent(Base):
    """One line of a task's log: what a worker (or the platform) did with it and when.

    Kinds: ``claimed``, ``resumed``, ``epoch``, ``checkpoint``, ``cancel_requested``, ``cancel_seen``,
    ``lease_lost``, ``requeued``, ``error``, ``finished``. ``message`` is the line as shown; ``data``
    holds the numbers behind it. Only the newest :data:`TASK_EVENTS_KEPT` of a task are kept.
    """

    __tablename__ = "task_events"
    __table_args__ = (Index("ix_task_events_task_id_id", "task_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(TASK_EVENT_KIND_MAX_LENGTH))
    message: Mapped[str] = mapped_column(Text, default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str] = mapped_column(String(WORKER_ID_MAX_LENGTH), default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
