"""Backbones as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from backend.models import Backbone, BackboneStatus


class BackboneRead(BaseModel):
    """A built-in backbone (``source: builtin``, no owner, never deletable) or one of your uploads.

    ``details`` says what validation found and did (prefixes stripped, classifier head dropped,
    format, dtypes) or, for a built-in, whether ImageNet weights are in the worker's torch cache;
    ``memory`` holds the measured training memory per megapixel of the architecture (null while
    it is being measured); ``problems`` lists the first mismatches of an invalid file.
    """

    id: int
    name: str
    architecture: str
    status: BackboneStatus
    source: str
    builtin: bool
    original_filename: str
    size_bytes: int
    sha256: str
    param_count: int
    details: dict[str, Any]
    memory: dict[str, Any] | None = Field(default=None)
    problems: list[dict[str, Any]]
    error: str
    created_at: datetime
    validated_at: datetime | None

    @classmethod
    def of(cls, row: Backbone, memory: dict[str, Any] | None) -> BackboneRead:
        """The API view of a row, with its architecture's memory figures."""
        return cls(
            id=row.id,
            name=row.name,
            architecture=row.architecture,
            status=row.status,
            source=row.source,
            builtin=row.owner_id is None,
            original_filename=row.original_filename,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            param_count=row.param_count,
            details={
                k: v for k, v in (row.details or {}).items() if k not in ("memory", "measure_requested_at")
            },
            memory=memory,
            problems=row.problems or [],
            error=row.error,
            created_at=row.created_at,
            validated_at=row.validated_at,
        )
