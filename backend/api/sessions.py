"""The caller's signed-in browser sessions: list them and sign any of them out."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from backend.api.deps import PrincipalDep, SessionDep
from backend.schemas.errors import ErrorResponse
from backend.schemas.sessions import SessionRead
from backend.services import sessions as session_service

router = APIRouter(prefix="/sessions", tags=["sessions"], responses={401: {"model": ErrorResponse}})


@router.get("", response_model=list[SessionRead])
def list_sessions(principal: PrincipalDep, session: SessionDep) -> list[SessionRead]:
    """Live sessions of the caller, most recently used first."""
    current_id = principal.session.id if principal.session else None
    return [
        SessionRead(
            id=row.id,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            expires_at=row.expires_at,
            user_agent=row.user_agent,
            ip=row.ip,
            current=row.id == current_id,
        )
        for row in session_service.list_active_sessions(session, principal.user)
    ]


@router.delete(
    "/{session_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}
)
def revoke_session(session_id: str, principal: PrincipalDep, session: SessionDep) -> Response:
    """Sign one of the caller's sessions out; another user's session is 404."""
    session_service.revoke_user_session(session, principal.user, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
