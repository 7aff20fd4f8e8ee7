"""Browser sign-in and sign-out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from backend import csrf
from backend.api.deps import OptionalPrincipal, PrincipalDep, SessionDep, SettingsDep
from backend.config import Settings
from backend.errors import TooManyRequests, Unauthorized
from backend.services import auth as auth_service
from backend.services import sessions as session_service
from backend.web.templating import flash, render

router = APIRouter(tags=["pages"], include_in_schema=False)
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
        "pages/login.html",
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


@router.get("/login")
def login_form(
    request: Request, principal: OptionalPrincipal, settings: SettingsDep, next: str = "/"
) -> Response:
    """The sign-in page (signed-in users go straight on)."""
    if principal is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, settings, next_url=safe_next(next))


@router.post("/login")
def login(
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
        user = auth_service.authenticate(session, settings, username, password, ip=ip)
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
    # A cookie the browser already had is retired: every sign-in gets a new session id.
    old_cookie = request.cookies.get(settings.session_cookie_name)
    if old_cookie:
        old = session_service.resolve_session(session, settings, old_cookie)
        if old is not None:
            session_service.revoke_session(session, old)
    created = session_service.create_session(
        session, settings, user, user_agent=request.headers.get("user-agent", ""), ip=ip
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


@router.post("/logout")
def logout(request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> Response:
    """End the current browser session on the server and clear its cookie."""
    if principal.session is not None:
        session_service.revoke_session(session, principal.session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        settings.session_cookie_name, httponly=True, samesite="lax", secure=settings.cookie_secure
    )
    flash(response, request, "info", "You have been signed out.")
    return response
