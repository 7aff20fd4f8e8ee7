"""The pages outside any one domain: the dashboard, the workflow sections still to come, and the
interactive API documentation (vendored Swagger UI, no CDN)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backend.accounts import sessions, tokens, users
from backend.deps import CurrentUser, SessionDep
from backend.ui.templating import render

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/")
def dashboard(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    """Welcome page: account counts and the getting-started steps."""
    counts = {
        "tokens": len(tokens.list_personal_tokens(session, user)),
        "sessions": len(sessions.list_active_sessions(session, user)),
        "users": users.count_users(session) if user.is_admin else None,
    }
    return render(request, "ui/dashboard.html", {"active": "dashboard", "counts": counts})


@router.get("/compare")
def compare(request: Request, user: CurrentUser) -> Response:
    """Comparison of finished tasks (empty state until tasks have run)."""
    return render(request, "ui/compare.html", {"active": "compare"})


@router.get("/docs")
def api_docs(request: Request) -> Response:
    """Swagger UI for ``/openapi.json``."""
    return render(request, "ui/docs.html", {"openapi_url": request.app.openapi_url})
