"""Administration of accounts (admins only; other users get 404)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from backend.api.deps import AdminUser, SessionDep, SettingsDep
from backend.errors import AppError, Invalid
from backend.models import Role, User
from backend.services import users as user_service
from backend.web.templating import flash, is_htmx, render

router = APIRouter(prefix="/admin", tags=["pages"], include_in_schema=False)


def _users_response(
    request: Request, session: Session, admin: User, *, status_code: int = 200, **extra: Any
) -> Response:
    context = {
        "active": "admin",
        "users": user_service.list_users(session),
        "roles": [role.value for role in Role],
        "form_error": None,
        "form_username": "",
        **extra,
    }
    template = "partials/users_panel.html" if is_htmx(request) else "pages/admin_users.html"
    return render(request, template, context, status_code=status_code)


@router.get("/users")
def users_page(request: Request, admin: AdminUser, session: SessionDep) -> Response:
    """All accounts with create / deactivate / reactivate controls."""
    return _users_response(request, session, admin)


@router.post("/users")
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
        user = user_service.create_user(session, settings, username, password, Role(role))
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


@router.post("/users/{user_id}/deactivate")
def deactivate_user(request: Request, user_id: int, admin: AdminUser, session: SessionDep) -> Response:
    """Deactivate an account: its sessions and tokens stop working at once."""
    user = user_service.get_user(session, user_id)
    user_service.deactivate_user(session, user, acting_user=admin)
    if is_htmx(request):
        return _users_response(request, session, admin)
    response = RedirectResponse("/admin/users", status_code=303)
    flash(response, request, "success", f"Account '{user.username}' deactivated.")
    return response


@router.post("/users/{user_id}/reactivate")
def reactivate_user(request: Request, user_id: int, admin: AdminUser, session: SessionDep) -> Response:
    """Let a deactivated account sign in again."""
    user = user_service.get_user(session, user_id)
    user_service.reactivate_user(session, user)
    if is_htmx(request):
        return _users_response(request, session, admin)
    response = RedirectResponse("/admin/users", status_code=303)
    flash(response, request, "success", f"Account '{user.username}' reactivated.")
    return response
