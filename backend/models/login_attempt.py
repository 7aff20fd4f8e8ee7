"""Login attempts, kept in the database so throttling (per account and per IP) holds across processes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Index, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow


class LoginAttempt(Base):
    """One password check for a username (existing or not) from a client IP, successful or failed.

    The row is written as a *pending* failure before the password is checked; the check settles
    it as a failure or turns it into a success. A pending row older than a check can take
    (``PENDING_STALE_SECONDS``: its process died mid-check) counts as a plain failure.
    """

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_username_at", "username", "at"),
        Index("ix_login_attempts_ip_at", "ip", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    success: Mapped[bool] = mapped_column(Boolean)
    pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ip: Mapped[str] = mapped_column(String(64), default="")
