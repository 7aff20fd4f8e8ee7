"""HTML pages (Jinja2 + HTMX) that call the same services as the API."""

from __future__ import annotations

from fastapi import APIRouter

from backend.web import account, admin, auth, docs, pages


def build_web_router() -> APIRouter:
    """Every HTML route."""
    router = APIRouter()
    for module in (auth, pages, account, admin, docs):
        router.include_router(module.router)
    return router
