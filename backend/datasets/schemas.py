"""Datasets as the API shows them: status, progress, the validation summary or the problems."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backend.models import DATASET_NAME_MAX_LENGTH, Dataset, DatasetStatus


class Progress(BaseModel):
    """How far validation is: ``done`` of ``total`` units (entries, then images) in ``phase``."""

    done: int
    total: int
    phase: str


class Problem(BaseModel):
    """One problem of an invalid dataset: which file, what is wrong, how to fix it."""

    model_config = ConfigDict(extra="allow")

    path: str
    code: str
    message: str
    hint: str = ""


class DatasetRead(BaseModel):
    """A dataset: what its page shows.

    ``summary`` (ready datasets): ``classes`` and ``class_to_index``, ``class_counts``,
    ``split_counts`` (train/val/test per class), ``image_stats`` (width, height, megapixels:
    min/median/max; formats), ``pyramids`` (levels and µm/px of pyramidal images) and
    ``thumbnails`` (``index``, ``class``, ``path``: fetch with ``/datasets/{id}/thumbnails/{index}``).
    ``problems`` (invalid datasets): every problem found.
    """

    id: int
    name: str
    status: DatasetStatus
    source: str
    original_filename: str
    size_bytes: int
    sha256: str
    num_images: int
    num_classes: int
    progress: Progress
    summary: dict[str, Any]
    problems: list[Problem]
    created_at: datetime
    validated_at: datetime | None

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetRead:
        """The API view of a row."""
        return cls(
            id=dataset.id,
            name=dataset.name,
            status=dataset.status,
            source=dataset.source,
            original_filename=dataset.original_filename,
            size_bytes=dataset.size_bytes,
            sha256=dataset.sha256,
            num_images=dataset.num_images,
            num_classes=dataset.num_classes,
            progress=Progress(
                done=dataset.progress_done, total=dataset.progress_total, phase=dataset.progress_phase
            ),
            summary=dataset.summary or {},
            problems=[Problem.model_validate(p) for p in dataset.problems or []],
            created_at=dataset.created_at,
            validated_at=dataset.validated_at,
        )


class DatasetDeleted(BaseModel):
    """The answer to a delete: ``deleted`` (row and files gone) or ``deleting`` (the validating
    worker stops and removes them)."""

    id: int
    status: str


class DatasetImport(BaseModel):
    """An import from the server's import root (administrators): ``path`` is relative to
    ``TESSERA_IMPORT_ROOT`` (an archive, a single image or slide, or a dataset folder);
    ``owner`` is a username (default: you)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=DATASET_NAME_MAX_LENGTH)
    path: str = Field(min_length=1, max_length=4096)
    owner: str | None = Field(default=None, max_length=150)
