"""Accounts: creating, listing, deactivating users and managing their passwords."""

from __future__ import annotations

import re
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.accounts import sessions as session_service
from backend.accounts import tokens as token_service
from backend.config import Settings
from backend.errors import Conflict, Invalid, NotFound
from backend.models import USERNAME_MAX_LENGTH, Role, TokenKind, User
from backend.security import hash_password, verify_password

USERNAME_PATTERN = re.compile(rf"^[a-z0-9][a-z0-9_.-]{{1,{USERNAME_MAX_LENGTH - 1}}}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def normalize_username(username: str) -> str:
    """Usernames are case-insensitive: stored and compared in lower case, without surrounding spaces."""
    return username.strip().lower()


def validate_username(username: str) -> str:
    """Return the normalized username or raise :class:`Invalid` with what is allowed."""
    normalized = normalize_username(username)
    if not USERNAME_PATTERN.fullmatch(normalized):
        raise Invalid(
            f"Usernames are 2 to {USERNAME_MAX_LENGTH} characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return normalized


def validate_password(password: str) -> str:
    """Return the password or raise :class:`Invalid` when it is too short or too long."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise Invalid(f"Passwords need at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise Invalid(f"Passwords can have at most {MAX_PASSWORD_LENGTH} characters.")
    return password


def generate_password() -> str:
    """A strong random password for accounts created without one."""
    return secrets.token_urlsafe(18)


def get_by_username(session: Session, username: str) -> User | None:
    """The user with this username (any letter case), or None."""
    return session.scalar(select(User).where(User.username == normalize_username(username)))


def get_user(session: Session, user_id: int) -> User:
    """The user with this id, or :class:`NotFound`."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


def list_users(session: Session) -> list[User]:
    """Every account, oldest first."""
    return list(session.scalars(select(User).order_by(User.created_at, User.id)))


def count_users(session: Session) -> int:
    """How many accounts exist (active or not)."""
    return session.scalar(select(func.count()).select_from(User)) or 0


def create_user(
    session: Session, settings: Settings, username: str, password: str, role: Role = Role.MEMBER
) -> User:
    """Create an active account; :class:`Conflict` when the username is taken."""
    normalized = validate_username(username)
    validate_password(password)
    if get_by_username(session, normalized) is not None:
        raise Conflict(f"The username '{normalized}' is already taken.")
    user = User(
        username=normalized, password_hash=hash_password(settings, password), role=role, is_active=True
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        # Another request created the same name between the check above and this insert; the
        # unique index is the real guard. The caller's transaction is rolled back as usual.
        raise Conflict(f"The username '{normalized}' is already taken.") from exc
    return user


def deactivate_user(session: Session, user: User, *, acting_user: User | None = None) -> User:
    """Disable an account and revoke all its sessions and tokens at once."""
    if acting_user is not None and acting_user.id == user.id:
        raise Invalid("You cannot deactivate your own account.")
    user.is_active = False
    session_service.revoke_all_for_user(session, user)
    token_service.revoke_all_for_user(session, user)
    session.flush()
    return user


def reactivate_user(session: Session, user: User) -> User:
    """Allow a deactivated account to sign in again (old sessions and tokens stay revoked)."""
    user.is_active = True
    session.flush()
    return user


def update_user(
    session: Session, user: User, *, acting_user: User, role: Role | None, is_active: bool | None
) -> User:
    """An administrator's change to an account: its role and whether it may sign in.

    Nobody changes their own role or deactivates themselves (an instance could lose its last
    admin); deactivation revokes every session and token at once.
    """
    if role is not None and role != user.role:
        if user.id == acting_user.id:
            raise Invalid("You cannot change your own role.")
        user.role = role
    if is_active is False and user.is_active:
        deactivate_user(session, user, acting_user=acting_user)
    elif is_active is True and not user.is_active:
        reactivate_user(session, user)
    session.flush()
    return user


def set_password(session: Session, settings: Settings, user: User, password: str) -> None:
    """Replace a user's password and sign them out everywhere (used by admins and the CLI).

    Everywhere means every browser session and every API token, personal ones included: this is
    the recovery path for an account that may be in someone else's hands.
    """
    user.password_hash = hash_password(settings, validate_password(password))
    session_service.revoke_all_for_user(session, user)
    token_service.revoke_all_for_user(session, user)
    session.flush()


def change_password(
    session: Session,
    settings: Settings,
    user: User,
    *,
    current_password: str,
    new_password: str,
    keep_session_id: str | None,
    keep_token_id: int | None = None,
) -> None:
    """Change one's own password after re-checking the current one.

    Signed out: every other browser session and every password-flow access token (``tsa_``),
    both obtained with the old password. Kept: the credential making this request
    (``keep_session_id`` or ``keep_token_id``) and the personal tokens (``tsr_``), which are
    named credentials for scripts that their owner lists and revokes one by one on the Settings
    page. ``tessera user set-password`` (account recovery) revokes those too.
    """
    if not verify_password(settings, current_password, user.password_hash):
        raise Invalid("The current password is not correct.")
    user.password_hash = hash_password(settings, validate_password(new_password))
    session_service.revoke_all_for_user(session, user, except_id=keep_session_id)
    token_service.revoke_all_for_user(session, user, kind=TokenKind.ACCESS, except_id=keep_token_id)
    session.flush()


def ensure_first_admin(session: Session, settings: Settings) -> str | None:
    """Create the first administrator when the database has no user at all.

    Uses ``settings.admin_username`` and ``settings.admin_password``; when no password is configured
    a strong one is generated and returned so the caller can show it once. Returns None when a user
    already existed or the password came from the settings. The caller owns the transaction.
    """
    if count_users(session) > 0:
        return None
    generated = None if settings.admin_password else generate_password()
    create_user(session, settings, settings.admin_username, settings.admin_password or generated, Role.ADMIN)
    return generated
