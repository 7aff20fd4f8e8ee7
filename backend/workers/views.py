"""The workers page: connected worker processes, their device, what they run, queue lengths
(the panel refreshes itself every few seconds)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backend.deps import CurrentUser, SessionDep, SettingsDep
from backend.ui.templating import render
from backend.workers import service

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/workers")
def workers_page(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> Response:
    """Workers and queues."""
    return render(
        request, "workers/list.html", {"active": "workers", **service.overview(session, settings, user)}
    )


@router.get("/workers/panel")
def workers_panel(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The page's panel, polled."""
    return render(request, "workers/panel.html", service.overview(session, settings, user))
