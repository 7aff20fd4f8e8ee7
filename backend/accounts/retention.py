"""Pruning account records that carry no information any more: old login attempts, and sessions
and tokens that expired or were revoked long ago.

Run periodically by the ``accounts.prune`` task (Celery beat); the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.models import ApiToken, LoginAttempt, UserSession, utcnow


@dataclass(frozen=True)
class Pruned:
    """How many rows of each table one pruning deleted."""

    login_attempts: int
    sessions: int
    tokens: int


def prune_account_records(session: Session, settings: Settings, *, now: datetime | None = None) -> Pruned:
    """Delete what is older than ``account_records_retention_days`` and can no longer matter.

    - login attempts older than the retention (never younger than the throttling window, which
      still needs them);
    - browser sessions and API tokens that expired or were revoked before the retention began.
      Live ones are never touched, however old.
    """
    now = now or utcnow()
    retention = timedelta(days=settings.account_records_retention_days)
    cutoff = now - retention
    attempts_cutoff = now - max(retention, timedelta(seconds=settings.login_window_seconds))
    bulk = {"synchronize_session": False}
    attempts = session.execute(
        delete(LoginAttempt).where(LoginAttempt.at < attempts_cutoff).execution_options(**bulk)
    )
    sessions = session.execute(
        delete(UserSession)
        .where(or_(UserSession.expires_at < cutoff, UserSession.revoked_at < cutoff))
        .execution_options(**bulk)
    )
    tokens = session.execute(
        delete(ApiToken)
        .where(or_(ApiToken.expires_at < cutoff, ApiToken.revoked_at < cutoff))
        .execution_options(**bulk)
    )
    session.flush()
    return Pruned(login_attempts=attempts.rowcount, sessions=sessions.rowcount, tokens=tokens.rowcount)
