"""Signed-in browser sessions as the API lists them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class SessionRead(BaseModel):
    """One live browser session; ``id`` is the stored hash, never the cookie value."""

    id: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    user_agent: str
    ip: str
    current: bool
