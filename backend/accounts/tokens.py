"""API bearer tokens: personal named tokens and OAuth2 password-flow access tokens.

Only a SHA-256 hash is stored; the plaintext is returned once at creation. The first characters
(``prefix``) are kept in clear so people can recognise a token in a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session, joinedload

from backend.config import Settings
from backend.db import touch_column
from backend.errors import Invalid, NotFound
from backend.models import TOKEN_NAME_MAX_LENGTH, ApiToken, TokenKind, User, utcnow
from backend.security import random_token, sha256_hex
from backend.text import has_control_characters

PERSONAL_TOKEN_PREFIX = "tsr_"
ACCESS_TOKEN_PREFIX = "tsa_"
# Prefix shown in lists: the marker plus a few random characters, far too few to guess the rest.
VISIBLE_PREFIX_LENGTH = 12
# Personal tokens are touched at most this often, so authenticated reads do not always write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class IssuedToken:
    """A token just created: ``plaintext`` is shown once and never stored."""

    plaintext: str
    row: ApiToken


def _issue(
    session: Session, user: User, *, kind: TokenKind, name: str, expires_in: int | None
) -> IssuedToken:
    marker = PERSONAL_TOKEN_PREFIX if kind == TokenKind.PERSONAL else ACCESS_TOKEN_PREFIX
    plaintext = marker + random_token(32)
    now = utcnow()
    row = ApiToken(
        user_id=user.id,
        name=name,
        kind=kind,
        token_hash=sha256_hex(plaintext),
        prefix=plaintext[:VISIBLE_PREFIX_LENGTH],
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in) if expires_in else None,
    )
    session.add(row)
    session.flush()
    return IssuedToken(plaintext=plaintext, row=row)


def create_personal_token(session: Session, user: User, name: str) -> IssuedToken:
    """Create a named long-lived token for scripts and the API."""
    clean = name.strip()
    if not clean:
        raise Invalid("Give the token a name, for example the script or machine that will use it.")
    if len(clean) > TOKEN_NAME_MAX_LENGTH:
        raise Invalid(f"Token names can have at most {TOKEN_NAME_MAX_LENGTH} characters.")
    if has_control_characters(clean):
        raise Invalid("Token names cannot contain control characters.")
    return _issue(session, user, kind=TokenKind.PERSONAL, name=clean, expires_in=None)


def issue_access_token(session: Session, settings: Settings, user: User) -> IssuedToken:
    """Issue a short-lived access token (OAuth2 password flow)."""
    return _issue(
        session,
        user,
        kind=TokenKind.ACCESS,
        name="password flow",
        expires_in=settings.access_token_max_age_seconds,
    )


#: Built once: every authenticated API request runs it, and building a statement costs more CPU
#: than running this one (the database answers it from an index).
_TOKEN_BY_HASH = (
    select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.token_hash == bindparam("token_hash"))
)


def resolve_token(session: Session, plaintext: str) -> ApiToken | None:
    """The live token for a bearer value, user loaded; None if unknown, revoked, expired or inactive."""
    if not plaintext:
        return None
    row = session.scalar(_TOKEN_BY_HASH, {"token_hash": sha256_hex(plaintext)})
    now = utcnow()
    if row is None or not row.is_valid(now) or not row.user.is_active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        stale = or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at <= now - LAST_USED_RESOLUTION)
        touch_column(session, row, ApiToken.last_used_at, now, stale)
    return row


def list_personal_tokens(session: Session, user: User) -> list[ApiToken]:
    """The user's personal tokens that still work, newest first."""
    rows = session.scalars(
        select(ApiToken)
        .where(
            ApiToken.user_id == user.id, ApiToken.kind == TokenKind.PERSONAL, ApiToken.revoked_at.is_(None)
        )
        .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
    )
    return list(rows)


def list_live_tokens(session: Session, user: User) -> list[ApiToken]:
    """Every token of the user that still works, both kinds, newest first.

    Password-flow access tokens are listed too, so their owner can see and revoke them before
    they expire.
    """
    now = utcnow()
    rows = session.scalars(
        select(ApiToken)
        .where(
            ApiToken.user_id == user.id,
            ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
        .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
    )
    return list(rows)


def revoke_token(session: Session, user: User, token_id: int) -> ApiToken:
    """Revoke one of the user's own tokens (either kind); anyone else's token is :class:`NotFound`."""
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id or row.revoked_at is not None:
        raise NotFound("No such token.")
    row.revoked_at = utcnow()
    session.flush()
    return row


def revoke_all_for_user(
    session: Session, user: User, *, kind: TokenKind | None = None, except_id: int | None = None
) -> None:
    """Revoke every token of ``user`` (on deactivation), or those of one ``kind``; ``except_id`` stays."""
    session.flush()  # pending changes (such as is_active) must not be lost to expire_all below
    statement = (
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if kind is not None:
        statement = statement.where(ApiToken.kind == kind)
    if except_id is not None:
        statement = statement.where(ApiToken.id != except_id)
    session.execute(statement)
    session.expire_all()
