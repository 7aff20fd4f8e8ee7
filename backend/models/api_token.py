"""Bearer tokens for the API: named personal tokens and short-lived OAuth2 access tokens."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Enum, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.models.base import Base, UTCDateTime, utcnow

if TYPE_CHECKING:
    from backend.models.user import User


#: Longest personal token name (the column width; schemas and services import it).
TOKEN_NAME_MAX_LENGTH = 100


class TokenKind(enum.StrEnum):
    """Personal tokens are created by hand and named; access tokens come from the password flow."""

    PERSONAL = "personal"
    ACCESS = "access"


class ApiToken(Base):
    """A bearer token stored only as its SHA-256 hash, with a short non-secret prefix for lists."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(TOKEN_NAME_MAX_LENGTH))
    kind: Mapped[TokenKind] = mapped_column(
        Enum(
            TokenKind,
            name="token_kind",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    user: Mapped[User] = relationship(back_populates="api_tokens", lazy="raise")

    def is_valid(self, now: datetime) -> bool:
        """True while the token is neither revoked nor past its expiry."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > now
