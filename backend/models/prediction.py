"""What a trained task's model is used for: predictions on uploaded images and evaluations on
other datasets. Both are jobs a worker runs (queued → running → succeeded | failed); the row is
the truth, its ``result`` what came out and ``error`` why it failed, in words meant for the user.

A prediction's files (the uploaded image, the thumbnail, the heatmap) live under
``<data_dir>/tasks/<task id>/predictions/<prediction id>/``; ``files`` names them relative to the
data dir. Deleting the task deletes the rows (ON DELETE CASCADE) and the folder.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow

#: Longest file name kept for an uploaded image.
PREDICTION_FILENAME_MAX_LENGTH = 255


class JobStatus(enum.StrEnum):
    """queued → running → succeeded | failed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def _status_column(name: str) -> Any:
    return mapped_column(
        Enum(
            JobStatus,
            name=name,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=JobStatus.QUEUED,
        index=True,
    )


class Prediction(Base):
    """One uploaded image run through a task's model: class probabilities and, for PatchGD, the
    per-cell evidence heatmap."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    status: Mapped[JobStatus] = _status_column("prediction_status")
    filename: Mapped[str] = mapped_column(String(PREDICTION_FILENAME_MAX_LENGTH), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    #: ``classes``, ``probabilities`` (class name → probability), ``predicted``, the input's size
    #: and how it was read, and for PatchGD the ``evidence`` grid.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    #: ``image``, ``thumbnail``, ``heatmap``: paths relative to the data dir (those that exist).
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: When its message was last sent (the re-dispatcher sends again a job left queued too long).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class Evaluation(Base):
    """A task's model evaluated on another ready dataset with the same classes."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    # The result outlives the dataset: deleting it keeps the evaluation (and its name).
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True, default=None
    )
    dataset_name: Mapped[str] = mapped_column(String(100), default="")
    status: Mapped[JobStatus] = _status_column("evaluation_status")
    #: ``split`` (test, val or all), ``accuracy``, ``qwk``, ``per_class_recall``,
    #: ``confusion_matrix``, ``classes``, ``num_samples``, ``loss``.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: When its message was last sent (the re-dispatcher sends again a job left queued too long).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
