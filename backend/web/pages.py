"""The main pages: dashboard and the workflow sections."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backend.api.deps import CurrentUser, SessionDep
from backend.services import sessions as session_service
from backend.services import tokens as token_service
from backend.services import users as user_service
from backend.web.templating import render

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/")
def dashboard(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    """Welcome page: account counts and the getting-started steps."""
    counts = {
        "tokens": len(token_service.list_personal_tokens(session, user)),
        "sessions": len(session_service.list_active_sessions(session, user)),
        "users": user_service.count_users(session) if user.is_admin else None,
    }
    return render(request, "pages/dashboard.html", {"active": "dashboard", "counts": counts})


@router.get("/tasks")
def tasks(request: Request, user: CurrentUser) -> Response:
    """Training tasks (empty state until tasks can be created)."""
    return render(request, "pages/tasks.html", {"active": "tasks"})


@router.get("/datasets")
def datasets(request: Request, user: CurrentUser) -> Response:
    """Datasets (empty state until uploads are available)."""
    return render(request, "pages/datasets.html", {"active": "datasets"})


@router.get("/backbones")
def backbones(request: Request, user: CurrentUser) -> Response:
    """Backbones (empty state until the catalog is available)."""
    return render(request, "pages/backbones.html", {"active": "backbones"})


@router.get("/compare")
def compare(request: Request, user: CurrentUser) -> Response:
    """Comparison of finished tasks (empty state until tasks have run)."""
    return render(request, "pages/compare.html", {"active": "compare"})
