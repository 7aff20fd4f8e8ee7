"""Datasets: an uploaded (or imported) archive of labelled images, validated by a worker."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow

#: Longest dataset name (the column width; schemas and services import it).
DATASET_NAME_MAX_LENGTH = 100


class DatasetStatus(enum.StrEnum):
    """uploading → validating → ready | invalid; the worker moves it, the row is the truth."""

    UPLOADING = "uploading"
    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


class Dataset(Base):
    """One dataset of one owner: where its files are, what the worker found in them, and its split.

    ``summary`` holds what the pages show (classes and their index mapping, per-class and per-split
    counts, image size statistics, pyramid levels and µm/px); ``problems`` the readable list of
    every problem of an invalid dataset. The per-file split lives in the dataset folder's report,
    not in the row, so a 100,000-image dataset does not make every list query heavy.
    """

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(DATASET_NAME_MAX_LENGTH))
    status: Mapped[DatasetStatus] = mapped_column(
        Enum(
            DatasetStatus,
            name="dataset_status",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=DatasetStatus.UPLOADING,
        index=True,
    )
    #: How the bytes arrived: "upload" (multipart or resumable), "import" (a server folder), "demo".
    source: Mapped[str] = mapped_column(String(16), default="upload")
    original_filename: Mapped[str] = mapped_column(String(255), default="")
    #: Folder of this dataset, relative to the data dir (everything it owns is under it).
    storage_path: Mapped[str] = mapped_column(String(1024), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    num_classes: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    problems: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_phase: Mapped[str] = mapped_column(String(32), default="")
    #: Set when the owner deletes the dataset while a worker validates it; the worker stops and cleans up.
    delete_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
