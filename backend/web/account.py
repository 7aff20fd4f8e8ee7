"""The Settings page: password, personal API tokens and active sessions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from backend.api.deps import PrincipalDep, SessionDep, SettingsDep
from backend.errors import AppError
from backend.services import sessions as session_service
from backend.services import tokens as token_service
from backend.services import users as user_service
from backend.services.auth import Principal
from backend.web.templating import flash, is_htmx, render

router = APIRouter(prefix="/settings", tags=["pages"], include_in_schema=False)


class _FormError(ValueError):
    """A form field problem shown next to the form."""


def _settings_context(principal: Principal, session: Session, **extra: Any) -> dict[str, Any]:
    return {
        "active": "settings",
        "tokens": token_service.list_personal_tokens(session, principal.user),
        "sessions": session_service.list_active_sessions(session, principal.user),
        "current_session_id": principal.session.id if principal.session else None,
        "new_token": None,
        "token_error": None,
        "password_error": None,
        **extra,
    }


def _tokens_response(
    request: Request, principal: Principal, session: Session, *, status_code: int = 200, **extra: Any
) -> Response:
    context = _settings_context(principal, session, **extra)
    template = "partials/tokens_panel.html" if is_htmx(request) else "pages/settings.html"
    return render(request, template, context, status_code=status_code)


@router.get("")
def settings_page(request: Request, principal: PrincipalDep, session: SessionDep) -> Response:
    """Account settings."""
    return render(request, "pages/settings.html", _settings_context(principal, session))


@router.post("/password")
def change_password(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    current_password: Annotated[str, Form()] = "",
    new_password: Annotated[str, Form()] = "",
    confirm_password: Annotated[str, Form()] = "",
) -> Response:
    """Change the password; every other browser session is signed out."""
    try:
        if new_password != confirm_password:
            raise _FormError("The new password and its confirmation do not match.")
        user_service.change_password(
            session,
            settings,
            principal.user,
            current_password=current_password,
            new_password=new_password,
            keep_session_id=principal.session.id if principal.session else None,
        )
    except (AppError, _FormError) as exc:
        context = _settings_context(principal, session, password_error=str(exc))
        return render(request, "pages/settings.html", context, status_code=400)
    response = RedirectResponse("/settings", status_code=303)
    flash(response, request, "success", "Password changed. Other browsers have been signed out.")
    return response


@router.post("/tokens")
def create_token(
    request: Request, principal: PrincipalDep, session: SessionDep, name: Annotated[str, Form()] = ""
) -> Response:
    """Create a personal API token and show it once."""
    try:
        issued = token_service.create_personal_token(session, principal.user, name)
    except AppError as exc:
        return _tokens_response(
            request, principal, session, status_code=exc.status_code, token_error=exc.detail
        )
    return _tokens_response(request, principal, session, new_token=issued)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: int, principal: PrincipalDep, session: SessionDep) -> Response:
    """Revoke one of the user's tokens."""
    token_service.revoke_token(session, principal.user, token_id)
    if is_htmx(request):
        return _tokens_response(request, principal, session)
    response = RedirectResponse("/settings", status_code=303)
    flash(response, request, "success", "Token revoked.")
    return response


@router.post("/sessions/{session_id}/revoke")
def revoke_session(
    request: Request, session_id: str, principal: PrincipalDep, session: SessionDep
) -> Response:
    """Sign out one of the user's browser sessions (the current one leads back to the sign-in page)."""
    session_service.revoke_user_session(session, principal.user, session_id)
    current = principal.session is not None and principal.session.id == session_id
    target = "/login" if current else "/settings"
    if is_htmx(request) and not current:
        return render(request, "partials/sessions_panel.html", _settings_context(principal, session))
    response = RedirectResponse(target, status_code=303)
    if is_htmx(request):
        response = Response(status_code=204, headers={"HX-Redirect": target})
    flash(response, request, "success", "Session signed out.")
    return response
