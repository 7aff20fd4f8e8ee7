"""Pruning account records on a real database: what is old and dead goes, what is live stays."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from backend.accounts.retention import Pruned, prune_account_records
from backend.db import session_scope
from backend.models import ApiToken, LoginAttempt, TokenKind, UserSession, utcnow


def _seed(settings, user_id: int, now) -> None:
    """Rows named by what should happen to them: ``keep-*`` stays, ``drop-*`` is pruned."""
    long_ago = now - timedelta(days=settings.account_records_retention_days + 1)
    recently = now - timedelta(days=1)
    with session_scope(settings) as session:
        for name, at in (("drop-old", long_ago), ("keep-recent", recently)):
            session.add(LoginAttempt(username=name, success=False, at=at, ip="192.0.2.1"))

        def add_session(name: str, *, created, expires, revoked=None) -> None:
            session.add(
                UserSession(
                    id=name.ljust(64, "0"),
                    user_id=user_id,
                    csrf_secret="x",
                    created_at=created,
                    last_seen_at=created,
                    expires_at=expires,
                    revoked_at=revoked,
                )
            )

        add_session("drop-expired", created=long_ago - timedelta(days=14), expires=long_ago)
        add_session("drop-revoked", created=long_ago, expires=now + timedelta(days=1), revoked=long_ago)
        add_session("keep-live-old", created=long_ago, expires=now + timedelta(days=1))
        add_session("keep-expired-recently", created=long_ago, expires=recently)
        add_session(
            "keep-revoked-recently", created=long_ago, expires=now + timedelta(days=1), revoked=recently
        )

        def add_token(name: str, *, expires=None, revoked=None) -> None:
            session.add(
                ApiToken(
                    user_id=user_id,
                    name=name,
                    kind=TokenKind.PERSONAL if expires is None else TokenKind.ACCESS,
                    token_hash=name.ljust(64, "0"),
                    prefix="tsr_x",
                    created_at=long_ago - timedelta(days=1),
                    expires_at=expires,
                    revoked_at=revoked,
                )
            )

        add_token("drop-expired", expires=long_ago)
        add_token("drop-revoked", revoked=long_ago)
        add_token("keep-personal-old")
        add_token("keep-expired-recently", expires=recently)
        add_token("keep-revoked-recently", revoked=recently)


def test_prune_deletes_only_old_dead_records(settings, make_user):
    user = make_user()
    now = utcnow()
    _seed(settings, user.id, now)

    with session_scope(settings) as session:
        pruned = prune_account_records(session, settings, now=now)
    assert pruned == Pruned(login_attempts=1, sessions=2, tokens=2)

    with session_scope(settings) as session:
        attempts = set(session.scalars(select(LoginAttempt.username)))
        sessions = {name.rstrip("0") for name in session.scalars(select(UserSession.id))}
        tokens = set(session.scalars(select(ApiToken.name)))
    assert attempts == {"keep-recent"}
    assert sessions == {"keep-live-old", "keep-expired-recently", "keep-revoked-recently"}
    assert tokens == {"keep-personal-old", "keep-expired-recently", "keep-revoked-recently"}

    # Nothing left to do: a second run deletes nothing.
    with session_scope(settings) as session:
        assert prune_account_records(session, settings, now=now) == Pruned(0, 0, 0)


def test_login_attempts_inside_the_throttling_window_survive_a_zero_retention(settings):
    now = utcnow()
    with session_scope(settings) as session:
        session.add(LoginAttempt(username="recent", success=False, at=now - timedelta(seconds=5), ip=""))
        session.add(
            LoginAttempt(
                username="gone",
                success=False,
                at=now - timedelta(seconds=settings.login_window_seconds + 5),
                ip="",
            )
        )
    no_retention = settings.model_copy(update={"account_records_retention_days": 0})
    with session_scope(no_retention) as session:
        assert prune_account_records(session, no_retention, now=now).login_attempts == 1
        assert list(session.scalars(select(LoginAttempt.username))) == ["recent"]
