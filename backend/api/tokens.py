"""Personal API tokens of the current user."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from backend.api.deps import CurrentUser, SessionDep
from backend.schemas.errors import ErrorResponse
from backend.schemas.tokens import TokenCreate, TokenCreated, TokenRead
from backend.services import tokens as token_service

router = APIRouter(prefix="/tokens", tags=["tokens"], responses={401: {"model": ErrorResponse}})


@router.get("", response_model=list[TokenRead])
def list_tokens(user: CurrentUser, session: SessionDep) -> list[TokenRead]:
    """The caller's active personal tokens (prefixes only)."""
    return [TokenRead.model_validate(row) for row in token_service.list_personal_tokens(session, user)]


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, user: CurrentUser, session: SessionDep) -> TokenCreated:
    """Create a personal token; the response is the only time its secret is shown."""
    issued = token_service.create_personal_token(session, user, body.name)
    return TokenCreated(**TokenRead.model_validate(issued.row).model_dump(), token=issued.plaintext)


@router.delete(
    "/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}
)
def revoke_token(token_id: int, user: CurrentUser, session: SessionDep) -> Response:
    """Revoke one of the caller's tokens; it stops working at once."""
    token_service.revoke_token(session, user, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
