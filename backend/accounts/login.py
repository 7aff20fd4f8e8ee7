"""Authentication: password checks with throttling, and resolving who is calling.

Failed attempts are counted per username and per client IP in the database (so throttling holds
across processes); see :func:`throttle_retry_after` for how the two limits combine.
Unknown usernames and wrong passwords are indistinguishable: same message, same status, and the
same argon2 cost.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import false, func, select, update
from sqlalchemy.orm import Session

from backend.accounts import sessions as session_service
from backend.accounts import tokens as token_service
from backend.accounts.users import get_by_username, normalize_username
from backend.config import Settings
from backend.errors import TooManyRequests, Unauthorized
from backend.models import USERNAME_MAX_LENGTH, ApiToken, LoginAttempt, Role, User, UserSession, utcnow
from backend.security import burn_password_check, hash_password, password_hasher
from backend.text import has_control_characters

INCORRECT_CREDENTIALS = "Incorrect username or password."
#: Width of the ``ip`` column of login attempts (an IPv6 address needs at most 45 characters).
IP_MAX = 64
#: A pending attempt older than this is taken for a check whose process died: a plain failure.
PENDING_STALE_SECONDS = 30
#: How long an attempt waits for others still being checked before it is refused (see
#: :func:`_reserve_attempt`), and how often it looks again meanwhile.
PENDING_WAIT_SECONDS = 10.0
PENDING_POLL_SECONDS = 0.05
#: Advisory lock (Postgres) that serializes sign-in reservations; any constant unique to this use.
RESERVATION_LOCK_KEY = 0x7E55E7A1


@dataclass(frozen=True)
class Principal:
    """Who is making a request, and how they proved it (a browser session or a bearer token)."""

    user: User
    session: UserSession | None = None
    token: ApiToken | None = None

    @property
    def via_session(self) -> bool:
        """True when authenticated by the session cookie (and therefore subject to CSRF checks)."""
        return self.session is not None


@dataclass(frozen=True)
class Viewer:
    """A plain snapshot of the caller for page rendering, usable after the transaction has ended.

    Error pages are rendered after a rollback, when ORM objects are expired and detached.
    """

    id: int
    username: str
    role: Role
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        """True for administrators."""
        return self.role == Role.ADMIN

    @classmethod
    def of(cls, principal: Principal) -> Viewer:
        """Snapshot ``principal`` (the CSRF token only exists for browser sessions)."""
        user = principal.user
        csrf_token = principal.session.csrf_secret if principal.session else ""
        return cls(id=user.id, username=user.username, role=user.role, csrf_token=csrf_token)


def _retry_after(failures: list[datetime], limit: int, window: timedelta, now: datetime) -> int | None:
    """Seconds until fewer than ``limit`` of ``failures`` (newest first) are inside the window."""
    if len(failures) < limit:
        return None
    unlock_at = failures[limit - 1] + window
    return max(1, int((unlock_at - now).total_seconds()) + 1)


def throttle_retry_after(
    session: Session,
    settings: Settings,
    username: str,
    now: datetime,
    *,
    ip: str = "",
    exclude_id: int | None = None,
    include_pending: bool = True,
) -> int | None:
    """Seconds until a sign-in as ``username`` from ``ip`` may be tried again, or None when it may now.

    Two limits, both over the sliding window of ``login_window_seconds`` (attempts still being
    checked count as failures unless ``include_pending`` is false, see :func:`_reserve_attempt`;
    ``exclude_id`` leaves out the caller's own):

    - **Per client IP**: ``login_ip_max_failures`` failures from ``ip``, against any accounts,
      refuse every sign-in from it. One client cannot guess across many accounts.
    - **Per account**: once ``username`` has ``login_max_failures`` failures since its last
      success, the lock applies only to the IPs that produced failures against it. A client with
      no recent failure against the account still gets its password checked (once: a wrong one
      makes it a failing IP too), so failures from elsewhere never lock the owner out.

    A lock lifts when the failures that caused it leave the window. ``func.max`` keeps the
    column type, so ``last_success`` comes back timezone-aware on SQLite too.
    """
    window = timedelta(seconds=settings.login_window_seconds)
    since = now - window
    failed = LoginAttempt.success.is_(False) & (LoginAttempt.at > since)
    being_checked = LoginAttempt.pending.is_(True) & (
        LoginAttempt.at >= now - timedelta(seconds=PENDING_STALE_SECONDS)
    )
    if not include_pending:
        failed &= ~being_checked
    if exclude_id is not None:
        failed &= LoginAttempt.id != exclude_id

    ip_failures = list(
        session.scalars(
            select(LoginAttempt.at)
            .where(failed, LoginAttempt.ip == ip)
            .order_by(LoginAttempt.at.desc())
            .limit(settings.login_ip_max_failures)
        )
    )
    ip_retry = _retry_after(ip_failures, settings.login_ip_max_failures, window, now)
    if ip_retry is not None:
        return ip_retry

    last_success = session.scalar(
        select(func.max(LoginAttempt.at)).where(
            LoginAttempt.username == username, LoginAttempt.success.is_(True), LoginAttempt.at > since
        )
    )
    account = failed & (LoginAttempt.username == username)
    if last_success is not None:
        account &= LoginAttempt.at > last_success
    account_failures = list(
        session.scalars(
            select(LoginAttempt.at)
            .where(account)
            .order_by(LoginAttempt.at.desc())
            .limit(settings.login_max_failures)
        )
    )
    account_retry = _retry_after(account_failures, settings.login_max_failures, window, now)
    if account_retry is None:
        return None
    newest_from_ip = session.scalar(select(func.max(LoginAttempt.at)).where(account, LoginAttempt.ip == ip))
    if newest_from_ip is None:
        return None  # the account is under attack, but not from this client
    ip_clean_in = max(1, int((newest_from_ip + window - now).total_seconds()) + 1)
    return min(account_retry, ip_clean_in)


def _lock_reservations(session: Session) -> None:
    """Serialize reservations: one transaction at a time counts the attempts and adds its own.

    Only this short count-and-insert is serialized, never a password check. Postgres takes a
    transaction-level advisory lock; SQLite takes its database write lock by starting with a
    write (a deferred transaction that read first could not write after another's commit).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(RESERVATION_LOCK_KEY)))
    else:
        session.execute(update(LoginAttempt).where(false()).values(pending=LoginAttempt.pending))


def _reserve_attempt(session: Session, settings: Settings, key: str, *, ip: str) -> int:
    """Record the attempt as a pending failure before the password is checked, or raise when throttled.

    Counting the earlier attempts (those still being checked count as failures) and adding this
    one happen in one serialized transaction of its own, committed at once, so at most
    ``login_max_failures`` attempts of a burst against one account (``login_ip_max_failures``
    from one IP) get as far as a password check, and the attempt counts even though the
    request's transaction is rolled back when the password is wrong.

    When the limit is reached only because of attempts still being checked, this one waits for
    them (up to ``PENDING_WAIT_SECONDS``, polling): if they were right passwords, the count
    starts again after their success and this attempt goes on; if they failed, it is refused.
    So a burst of right passwords (many scripts signing in at once) is checked ten at a time
    instead of being refused, and a burst of wrong ones still gets at most ten checks. The
    request's own connection is not used here: it may be the only one the pool has left.
    """
    ip = ip[:IP_MAX]
    deadline = time.monotonic() + PENDING_WAIT_SECONDS
    with Session(bind=session.get_bind()) as own:
        while True:
            now = utcnow()
            with own.begin():
                _lock_reservations(own)
                retry_after = throttle_retry_after(own, settings, key, now, ip=ip)
                if retry_after is None:
                    row = LoginAttempt(username=key, success=False, pending=True, at=now, ip=ip)
                    own.add(row)
                    own.flush()
                    return row.id
                settled = throttle_retry_after(own, settings, key, now, ip=ip, include_pending=False)
            if settled is not None or time.monotonic() >= deadline:
                retry_after = settled or retry_after
                raise TooManyRequests(
                    f"Too many failed sign-in attempts. Try again in {retry_after} seconds.",
                    retry_after=retry_after,
                )
            time.sleep(PENDING_POLL_SECONDS * (1 + random.random()))


def _settle_failure(session: Session, attempt_id: int) -> None:
    """Mark a checked attempt as failed, in its own transaction (the request's is rolled back)."""
    with Session(bind=session.get_bind()) as own, own.begin():
        own.execute(update(LoginAttempt).where(LoginAttempt.id == attempt_id).values(pending=False))


def authenticate(session: Session, settings: Settings, username: str, password: str, *, ip: str = "") -> User:
    """Check a username and password sent from client address ``ip``; return the active user or raise.

    Raises :class:`TooManyRequests` (with Retry-After) when this client is throttled for this
    account or altogether, even for the right password, and :class:`Unauthorized` with one
    generic message for every other failure.
    The attempt is recorded as a pending failure in a short transaction of its own before the
    password is checked (so concurrent guesses cannot all slip under the limit, and the failure
    counts although the request's transaction is rolled back on errors); a wrong password
    settles it as a failure, a right one turns it into a success in the request's transaction.
    """
    key = normalize_username(username)
    if len(key) > USERNAME_MAX_LENGTH or has_control_characters(key):
        # No account has such a name. Never truncate it: that would sign in (or throttle) the
        # account whose name is its first characters. It counts as a failure of "no account"
        # (and a NUL could not even be stored on Postgres).
        key = ""
    attempt_id = _reserve_attempt(session, settings, key, ip=ip)
    user = get_by_username(session, key) if key else None
    if user is None:
        burn_password_check(settings, password)
        valid = False
    else:
        valid, new_hash = password_hasher(settings).verify_and_update(password, user.password_hash)
        if valid and new_hash is not None:
            # Hash parameters changed since this password was set: store it at today's cost.
            user.password_hash = hash_password(settings, password)
    if user is None or not valid or not user.is_active:
        _settle_failure(session, attempt_id)
        raise Unauthorized(INCORRECT_CREDENTIALS)
    session.execute(
        update(LoginAttempt).where(LoginAttempt.id == attempt_id).values(success=True, pending=False)
    )
    # Old attempts are deleted by the periodic ``accounts.prune`` task (backend.accounts.retention).
    session.flush()
    return user


def resolve_principal(
    session: Session, settings: Settings, *, authorization: str | None, session_cookie: str | None
) -> Principal | None:
    """Identify the caller from an ``Authorization: Bearer`` header or, failing that, the session cookie.

    A bearer header that is present but invalid is not silently replaced by the cookie: the
    caller meant to use the token, so the request is unauthenticated.
    """
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token_service.resolve_token(session, value.strip())
        return Principal(user=token.user, token=token) if token else None
    if session_cookie:
        row = session_service.resolve_session(session, settings, session_cookie)
        return Principal(user=row.user, session=row) if row else None
    return None
