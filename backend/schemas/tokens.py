"""Personal API tokens."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class TokenCreate(BaseModel):
    """A name that says where the token will be used."""

    name: str = Field(min_length=1, max_length=100, examples=["training scripts on gpu-01"])


class TokenRead(BaseModel):
    """A token as listed: its non-secret prefix and usage, never the secret."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None


class TokenCreated(TokenRead):
    """Returned once, at creation: ``token`` is the only time the secret is shown."""

    token: str
