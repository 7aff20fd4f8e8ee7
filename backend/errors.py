"""Typed application errors that carry their HTTP status.

Services raise these; ``backend.main`` turns them into ``{"error": ..., "detail": ...}`` for the API
and into a friendly page (or an HTMX toast) for the browser.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class AppError(Exception):
    """Base class: ``code`` is a stable machine-readable name, ``detail`` is shown to the user."""

    status_code = 500
    code = "internal_error"
    default_detail = "Something went wrong on our side."

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.detail = detail or self.default_detail
        self.headers = headers or {}
        super().__init__(self.detail)


class Invalid(AppError):
    """The request is well-formed but its content is not acceptable."""

    status_code = 400
    code = "invalid"
    default_detail = "The request is not valid."


class Unauthorized(AppError):
    """No valid credentials were presented."""

    status_code = 401
    code = "unauthorized"
    default_detail = "Please sign in."


class Forbidden(AppError):
    """Credentials are valid but the request is refused (for example a missing CSRF token)."""

    status_code = 403
    code = "forbidden"
    default_detail = "This request is not allowed."


class NotFound(AppError):
    """The object does not exist, or belongs to someone else (never leak which)."""

    status_code = 404
    code = "not_found"
    default_detail = "Not found."


class Conflict(AppError):
    """The request clashes with existing state (a duplicate name, a finished task...)."""

    status_code = 409
    code = "conflict"
    default_detail = "This conflicts with existing data."


class TooManyRequests(AppError):
    """Throttled; ``retry_after`` seconds is sent as the Retry-After header."""

    status_code = 429
    code = "too_many_requests"
    default_detail = "Too many attempts. Try again later."

    def __init__(self, detail: str | None = None, *, retry_after: int) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(detail, headers={"Retry-After": str(self.retry_after)})


class ErrorResponse(BaseModel):
    """The shape of every JSON error: ``error`` is a stable code (``not_found``, ``invalid``...);
    ``detail`` explains it to a person."""

    error: str
    detail: Any
