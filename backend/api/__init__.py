"""JSON API under /api/v1: one router per resource."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api import auth, sessions, tokens, users

API_PREFIX = "/api/v1"


def build_api_router() -> APIRouter:
    """All API routers mounted under ``/api/v1``."""
    router = APIRouter(prefix=API_PREFIX)
    router.include_router(auth.router)
    router.include_router(users.router)
    router.include_router(tokens.router)
    router.include_router(sessions.router)
    return router
