"""OAuth2 password-flow responses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AccessToken(BaseModel):
    """A short-lived bearer token, as OAuth2 clients expect it."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
