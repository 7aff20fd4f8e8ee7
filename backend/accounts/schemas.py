"""Accounts as the API shows and accepts them: users, password-flow tokens, personal tokens, sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.accounts.users import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from backend.models import TOKEN_NAME_MAX_LENGTH, USERNAME_MAX_LENGTH, Role, TokenKind


class AccessToken(BaseModel):
    """A short-lived bearer token, as OAuth2 clients expect it."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class UserRead(BaseModel):
    """An account (never its password hash)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    is_active: bool
    created_at: datetime


class UserCreate(BaseModel):
    """What an administrator sends to create an account."""

    username: str = Field(min_length=2, max_length=USERNAME_MAX_LENGTH, examples=["alice"])
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)
    role: Role = Role.MEMBER


class UserUpdate(BaseModel):
    """Fields an administrator may change; ``is_active: false`` revokes every session and token."""

    is_active: bool | None = None
    role: Role | None = None


class PasswordChange(BaseModel):
    """Change one's own password: the current one is checked again."""

    current_password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)
    new_password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


class TokenCreate(BaseModel):
    """A name that says where the token will be used."""

    name: str = Field(min_length=1, max_length=TOKEN_NAME_MAX_LENGTH, examples=["training scripts on gpu-01"])


class TokenRead(BaseModel):
    """A token as listed: its non-secret prefix and usage, never the secret."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: TokenKind = Field(
        description="`personal` (named, `tsr_`, until revoked) or `access` (password flow, `tsa_`, expires)."
    )
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None


class TokenCreated(TokenRead):
    """Returned once, at creation: ``token`` is the only time the secret is shown."""

    token: str


class SessionRead(BaseModel):
    """One live browser session; ``id`` is the stored hash, never the cookie value."""

    id: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    user_agent: str
    ip: str
    current: bool
