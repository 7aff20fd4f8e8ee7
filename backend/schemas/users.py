"""User accounts as the API shows and accepts them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from backend.models import Role


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

    username: str = Field(min_length=2, max_length=64, examples=["alice"])
    password: str = Field(min_length=8, max_length=1024)
    role: Role = Role.MEMBER


class UserUpdate(BaseModel):
    """Fields an administrator may change; ``is_active: false`` revokes every session and token."""

    is_active: bool | None = None
    role: Role | None = None


class PasswordChange(BaseModel):
    """Change one's own password: the current one is checked again."""

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)
