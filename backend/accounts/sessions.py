"""Server-side browser sessions: created at login, checked on every request, revocable."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session, joinedload

from backend.config import Settings
from backend.db import touch_column
from backend.errors import NotFound
from backend.models import User, UserSession, utcnow
from backend.security import random_token, sha256_hex

USER_AGENT_MAX = 255
IP_MAX = 64


@dataclass(frozen=True)
class NewSession:
    """A freshly created session: ``cookie_value`` goes to the browser, ``row`` stays on the server."""

    cookie_value: str
    row: UserSession


def create_session(
    session: Session, settings: Settings, user: User, *, user_agent: str, ip: str
) -> NewSession:
    """Start a new session for ``user`` with a new random id and CSRF secret."""
    cookie_value = random_token(32)
    now = utcnow()
    row = UserSession(
        id=sha256_hex(cookie_value),
        user_id=user.id,
        csrf_secret=random_token(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(seconds=settings.session_max_age_seconds),
        user_agent=user_agent[:USER_AGENT_MAX],
        ip=ip[:IP_MAX],
    )
    session.add(row)
    session.flush()
    return NewSession(cookie_value=cookie_value, row=row)


def sign_in(
    session: Session,
    settings: Settings,
    user: User,
    *,
    previous_cookie: str | None,
    user_agent: str,
    ip: str,
) -> NewSession:
    """Start the session of a successful sign-in, retiring the one the browser already had.

    Every sign-in gets a new session id, so a session id planted before sign-in (session
    fixation) is worthless afterwards.
    """
    if previous_cookie:
        old = resolve_session(session, settings, previous_cookie)
        if old is not None:
            revoke_session(session, old)
    return create_session(session, settings, user, user_agent=user_agent, ip=ip)


#: Built once: every signed-in page and poll runs it (see ``tokens._TOKEN_BY_HASH``).
_SESSION_BY_ID = (
    select(UserSession).options(joinedload(UserSession.user)).where(UserSession.id == bindparam("session_id"))
)


def resolve_session(session: Session, settings: Settings, cookie_value: str) -> UserSession | None:
    """The live session behind a cookie value, with its user loaded; None if unknown, revoked or expired.

    A session whose user has been deactivated is rejected too, so deactivation takes effect on
    the very next request.
    """
    if not cookie_value:
        return None
    row = session.scalar(_SESSION_BY_ID, {"session_id": sha256_hex(cookie_value)})
    now = utcnow()
    if row is None or not row.is_valid(now) or not row.user.is_active:
        return None
    # Writing on every request would serialize all reads behind SQLite's single writer.
    interval = timedelta(seconds=settings.session_touch_interval_seconds)
    if now - row.last_seen_at >= interval:
        touch_column(session, row, UserSession.last_seen_at, now, UserSession.last_seen_at <= now - interval)
    return row


def revoke_session(session: Session, row: UserSession) -> None:
    """End one session now (logout)."""
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()


def list_active_sessions(session: Session, user: User) -> list[UserSession]:
    """The user's sessions that are neither revoked nor expired, most recently used first."""
    now = utcnow()
    rows = session.scalars(
        select(UserSession)
        .where(UserSession.user_id == user.id, UserSession.revoked_at.is_(None), UserSession.expires_at > now)
        .order_by(UserSession.last_seen_at.desc())
    )
    return list(rows)


def revoke_user_session(session: Session, user: User, session_id: str) -> UserSession:
    """Revoke one of the user's own sessions by id; another user's session is :class:`NotFound`."""
    row = session.get(UserSession, session_id)
    if row is None or row.user_id != user.id:
        raise NotFound("No such session.")
    revoke_session(session, row)
    return row


def revoke_all_for_user(session: Session, user: User, *, except_id: str | None = None) -> None:
    """Revoke every live session of ``user`` (optionally keeping the current one)."""
    session.flush()  # pending changes (such as is_active) must not be lost to expire_all below
    statement = (
        update(UserSession)
        .where(UserSession.user_id == user.id, UserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if except_id is not None:
        statement = statement.where(UserSession.id != except_id)
    session.execute(statement)
    session.expire_all()
