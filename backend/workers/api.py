"""``GET /api/v1/workers``: the connected worker processes and the queue lengths."""

from __future__ import annotations

from fastapi import APIRouter

from backend.deps import CurrentUser, SessionDep, SettingsDep
from backend.errors import ErrorResponse
from backend.workers import service
from backend.workers.schemas import WorkersRead

router = APIRouter(prefix="/workers", tags=["workers"], responses={401: {"model": ErrorResponse}})


@router.get("", response_model=WorkersRead)
def list_workers(user: CurrentUser, session: SessionDep, settings: SettingsDep) -> WorkersRead:
    """Every worker process with its device and what it runs (a training task is named only to its
    owner and to admins), and the queue lengths: tasks from the database, messages from the broker
    when it answers within a short timeout."""
    return WorkersRead.model_validate(service.overview(session, settings, user))
