"""Accounts: people who log in to Tessera."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Boolean, Enum, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.models.base import Base, UTCDateTime, utcnow

if TYPE_CHECKING:
    from backend.models.api_token import ApiToken
    from backend.models.user_session import UserSession


#: Longest username (the column width; schemas and services import it, never repeat it).
USERNAME_MAX_LENGTH = 64


class Role(enum.StrEnum):
    """What a user may do: admins also manage accounts."""

    ADMIN = "admin"
    MEMBER = "member"


class User(Base):
    """A person with a username, an argon2 password hash and a role."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX_LENGTH), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(
        Enum(
            Role,
            name="user_role",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    sessions: Mapped[list[UserSession]] = relationship(back_populates="user", lazy="raise")
    api_tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", lazy="raise")

    @property
    def is_admin(self) -> bool:
        """True for administrators."""
        return self.role == Role.ADMIN
