"""OAuth2 password flow: exchange a username and password for a short-lived bearer token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from backend.api.deps import SessionDep, SettingsDep
from backend.schemas.auth import AccessToken
from backend.schemas.errors import ErrorResponse
from backend.services import auth as auth_service
from backend.services import tokens as token_service

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/token",
    response_model=AccessToken,
    responses={401: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
def issue_token(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> AccessToken:
    """Check the form's username and password and return a bearer access token."""
    ip = request.client.host if request.client else ""
    user = auth_service.authenticate(session, settings, form.username, form.password, ip=ip)
    issued = token_service.issue_access_token(session, settings, user)
    return AccessToken(access_token=issued.plaintext, expires_in=settings.access_token_max_age_seconds)
