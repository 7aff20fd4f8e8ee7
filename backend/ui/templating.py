"""Jinja2 rendering for pages and HTMX fragments, plus one-shot flash messages.

Every template is autoescaped. ``render`` adds what the base layout needs: the signed-in user,
the CSRF token, the active navigation entry and pending flash messages.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request, Response
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from backend.config import Settings
from backend.security import constant_time_equal, sign

FRONTEND_DIR = Path(__file__).resolve().parent.parent.parent / "frontend"
TEMPLATES_DIR = FRONTEND_DIR / "templates"
STATIC_DIR = FRONTEND_DIR / "static"
FLASH_COOKIE = "tessera_flash"
_FLASH_PURPOSE = "flash"
FLASH_LEVELS = frozenset({"success", "info", "warning", "error"})

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
)


def _datetime_filter(value: Any) -> str:
    if value is None:
        return "never"
    return value.strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters["dt"] = _datetime_filter


def is_htmx(request: Request) -> bool:
    """True when the request was sent by HTMX (and wants a fragment, not a page)."""
    return request.headers.get("HX-Request") == "true"


def _read_flashes(request: Request, settings: Settings) -> list[dict[str, str]]:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw or "." not in raw:
        return []
    payload, signature = raw.rsplit(".", 1)
    if not constant_time_equal(signature, sign(settings, _FLASH_PURPOSE, payload)):
        return []
    try:
        messages = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except ValueError:
        return []
    return [
        {"level": str(m["level"]), "text": str(m["text"])}
        for m in messages
        if isinstance(m, dict) and m.get("level") in FLASH_LEVELS and "text" in m
    ]


def flash(response: Response, request: Request, level: str, text: str) -> None:
    """Show ``text`` on the next page this browser renders (after a redirect)."""
    settings: Settings = request.app.state.settings
    messages = [*_read_flashes(request, settings), {"level": level, "text": text}]
    payload = base64.urlsafe_b64encode(json.dumps(messages).encode("utf-8")).decode("ascii")
    response.set_cookie(
        FLASH_COOKIE,
        f"{payload}.{sign(settings, _FLASH_PURPOSE, payload)}",
        max_age=300,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )


def render(
    request: Request,
    name: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """Render a page or fragment with the base layout's context; consumes pending flash messages."""
    settings: Settings = request.app.state.settings
    viewer = getattr(request.state, "viewer", None)
    flashes = _read_flashes(request, settings)
    full_context: dict[str, Any] = {
        "user": viewer,
        "csrf_token": viewer.csrf_token if viewer else "",
        "flashes": flashes,
        "active": "",
        "error": None,
    }
    full_context.update(context or {})
    response = templates.TemplateResponse(
        request, name, full_context, status_code=status_code, headers=headers
    )
    if flashes:
        response.delete_cookie(FLASH_COOKIE, httponly=True, samesite="lax", secure=settings.cookie_secure)
    return response
