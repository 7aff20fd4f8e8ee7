"""Account pages: sign-in and sign-out, the Settings page (password, personal tokens, sessions), and
account administration (admins only; other users get 404).

Views parse the form, call one service function, and render; the request owns the transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from backend import csrf
from backend.accounts import login, sessions, tokens, users
from backend.accounts.login import Principal
from backend.config import Settings
from backend.deps import (
    AdminUser,
    OptionalPrincipal,
    PrincipalDep,
    RowId,
    SessionDep,
    SessionId,
    SettingsDep,
)
from backend.errors import AppError, Invalid, TooManyRequests, Unauthorized
from backend.models import Role, User
from backend.ui.templating import flash, is_htmx, render

auth_router = APIRouter(tags=["pages"], include_in_schema=False)
LOGIN_CSRF_MAX_AGE = 24 * 3600


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: only a path on this site (never ``//host`` or an absolute URL)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _login_page(
    request: Request,
    settings: Settings,
    *,
    next_url: str,
    username: str = "",
    error: str | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    cookie_value = csrf.login_cookie_value(request)
    response = render(
        request,
        "accounts/login.html",
        {
            "active": "login",
            "login_csrf": csrf.login_form_token(settings, cookie_value),
            "next_url": next_url,
            "username": username,
            "error": error,
        },
        status_code=status_code,
        headers=headers,
    )
    response.set_cookie(
        csrf.LOGIN_CSRF_COOKIE,
        cookie_value,
        max_age=LOGIN_CSRF_MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return response


@auth_router.get("/login")
def sign_in_form(
    request: Request, principal: OptionalPrincipal, settings: SettingsDep, next: str = "/"
) -> Response:
    """The sign-in page (signed-in users go straight on)."""
    if principal is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, settings, next_url=safe_next(next))


@auth_router.post("/login")
def sign_in(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Check the credentials, start a brand-new session and set its cookie."""
    next_url = safe_next(next)
    if not csrf.login_token_valid(settings, request.cookies.get(csrf.LOGIN_CSRF_COOKIE), csrf_token):
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            error="Your sign-in form expired. Please try again.",
            status_code=403,
        )
    ip = request.client.host if request.client else ""
    try:
        user = login.authenticate(session, settings, username, password, ip=ip)
    except TooManyRequests as exc:
        return _login_page(
            request,
            settings,
            next_url=next_url,
            username=username,
            error=exc.detail,
            status_code=429,
            headers=exc.headers,
        )
    except Unauthorized as exc:
        return _login_page(
            request, settings, next_url=next_url, username=username, error=exc.detail, status_code=401
        )
    created = sessions.sign_in(
        session,
        settings,
        user,
        previous_cookie=request.cookies.get(settings.session_cookie_name),
        user_agent=request.headers.get("user-agent", ""),
        ip=ip,
    )
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        settings.session_cookie_name,
        created.cookie_value,
        max_age=settings.session_max_age_seconds,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return response


@auth_router.post("/logout")
def sign_out(
    request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """End the current browser session on the server and clear its cookie."""
    if principal.session is not None:
        sessions.revoke_session(session, principal.session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        settings.session_cookie_name, httponly=True, samesite="lax", secure=settings.cookie_secure
    )
    flash(response, request, "info", "You have been signed out.")
    return response


settings_router = APIRouter(prefix="/settings", tags=["pages"], include_in_schema=False)


class _FormError(ValueError):
    """A form field problem shown next to the form."""


def _settings_context(principal: Principal, session: Session, **extra: Any) -> dict[str, Any]:
    return {
        "active": "settings",
        "tokens": tokens.list_live_tokens(session, principal.user),
        "sessions": sessions.list_active_sessions(session, principal.user),
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
    template = "accounts/tokens_panel.html" if is_htmx(request) else "accounts/settings.html"
    return render(request, template, context, status_code=status_code)


@settings_router.get("")
def settings_page(request: Request, principal: PrincipalDep, session: SessionDep) -> Response:
    """Account settings."""
    return render(request, "accounts/settings.html", _settings_context(principal, session))


@settings_router.post("/password")
def change_password(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    current_password: Annotated[str, Form()] = "",
    new_password: Annotated[str, Form()] = "",
    confirm_password: Annotated[str, Form()] = "",
) -> Response:
    """Change the password; other browser sessions and password-flow tokens are signed out."""
    try:
        if new_password != confirm_password:
            raise _FormError("The new password and its confirmation do not match.")
        users.change_password(
            session,
            settings,
            principal.user,
            current_password=current_password,
            new_password=new_password,
            keep_session_id=principal.session.id if principal.session else None,
        )
    except (AppError, _FormError) as exc:
        context = _settings_context(principal, session, password_error=str(exc))
        return render(request, "accounts/settings.html", context, status_code=400)
    response = RedirectResponse("/settings", status_code=303)
    flash(
        response,
        request,
        "success",
        "Password changed. Other browsers and password-flow tokens have been signed out.",
    )
    return response


@settings_router.post("/tokens")
def create_token(
    request: Request, principal: PrincipalDep, session: SessionDep, name: Annotated[str, Form()] = ""
) -> Response:
    """Create a personal API token and show it once."""
    try:
        issued = tokens.create_personal_token(session, principal.user, name)
    except AppError as exc:
        return _tokens_response(
            request, principal, session, status_code=exc.status_code, token_error=exc.detail
        )
    return _tokens_response(request, principal, session, new_token=issued)


@settings_router.post("/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: RowId, principal: PrincipalDep, session: SessionDep) -> Response:
    """Revoke one of the user's tokens."""
    tokens.revoke_token(session, principal.user, token_id)
    if is_htmx(request):
        return _tokens_response(request, principal, session)
    response = RedirectResponse("/settings", status_code=303)
    flash(response, request, "success", "Token revoked.")
    return response


@settings_router.post("/sessions/{session_id}/revoke")
def revoke_session(
    request: Request, session_id: SessionId, principal: PrincipalDep, session: SessionDep
) -> Response:
    """Sign out one of the user's browser sessions (the current one leads back to the sign-in page)."""
    sessions.revoke_user_session(session, principal.user, session_id)
    current = principal.session is not None and principal.session.id == session_id
    target = "/login" if current else "/settings"
    if is_htmx(request) and not current:
        return render(request, "accounts/sessions_panel.html", _settings_context(principal, session))
    response = RedirectResponse(target, status_code=303)
    if is_htmx(request):
        response = Response(status_code=204, headers={"HX-Redirect": target})
    flash(response, request, "success", "Session signed out.")
    return response


admin_router = APIRouter(prefix="/admin", tags=["pages"], include_in_schema=False)


def _users_response(
    request: Request, session: Session, admin: User, *, status_code: int = 200, **extra: Any
) -> Response:
    context = {
        "active": "admin",
        "users": users.list_users(session),
        "roles": [role.value for role in Role],
        "form_error": None,
        "form_username": "",
        **extra,
    }
    template = "accounts/users_panel.html" if is_htmx(request) else "accounts/admin_users.html"
    return render(request, template, context, status_code=status_code)


@admin_router.get("/users")
def users_page(request: Request, admin: AdminUser, session: SessionDep) -> Response:
    """All accounts with create / deactivate / reactivate controls."""
    return _users_response(request, session, admin)


@admin_router.post("/users")
def create_user(
    request: Request,
    admin: AdminUser,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = Role.MEMBER.value,
) -> Response:
    """Create an account from the admin form."""
    try:
        if role not in {r.value for r in Role}:
            raise Invalid("Choose a role: admin or member.")
        user = users.create_user(session, settings, username, password, Role(role))
    except AppError as exc:
        return _users_response(
            request,
            session,
            admin,
            status_code=exc.status_code,
            form_error=exc.detail,
            form_username=username,
        )
    if is_htmx(request):
        return _users_response(request, session, admin, created=user.username)
    response = RedirectResponse("/admin/users", status_code=303)
    flash(response, request, "success", f"Account '{user.username}' created.")
    return response


@admin_router.post("/users/{user_id}/deactivate")
def deactivate_user(request: Request, user_id: RowId, admin: AdminUser, session: SessionDep) -> Response:
    """Deactivate an account: its sessions and tokens stop working at once."""
    user = users.get_user(session, user_id)
    users.deactivate_user(session, user, acting_user=admin)
    if is_htmx(request):
        return _users_response(request, session, admin)
    response = RedirectResponse("/admin/users", status_code=303)
    flash(response, request, "success", f"Account '{user.username}' deactivated.")
    return response


@admin_router.post("/users/{user_id}/reactivate")
def reactivate_user(request: Request, user_id: RowId, admin: AdminUser, session: SessionDep) -> Response:
    """Let a deactivated account sign in again."""
    user = users.get_user(session, user_id)
    users.reactivate_user(session, user)
    if is_htmx(request):
        return _users_response(request, session, admin)
    response = RedirectResponse("/admin/users", status_code=303)
    flash(response, request, "success", f"Account '{user.username}' reactivated.")
    return response


router = APIRouter()
for _router in (auth_router, settings_router, admin_router):
    router.include_router(_router)
