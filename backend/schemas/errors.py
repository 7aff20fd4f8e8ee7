"""The shape of every JSON error response."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    """``error`` is a stable code (``not_found``, ``invalid``...); ``detail`` explains it to a person."""

    error: str
    detail: Any
