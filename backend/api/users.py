"""Accounts: the caller's own profile, and administration of every account (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from backend.api.deps import AdminUser, CurrentUser, PrincipalDep, SessionDep, SettingsDep
from backend.errors import Invalid
from backend.schemas.errors import ErrorResponse
from backend.schemas.users import PasswordChange, UserCreate, UserRead, UserUpdate
from backend.services import users as user_service

router = APIRouter(prefix="/users", tags=["users"], responses={401: {"model": ErrorResponse}})


@router.get("/me", response_model=UserRead)
def read_me(user: CurrentUser) -> UserRead:
    """The account the request is authenticated as."""
    return UserRead.model_validate(user)


@router.put("/me/password", status_code=status.HTTP_204_NO_CONTENT, responses={400: {"model": ErrorResponse}})
def change_my_password(
    body: PasswordChange, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """Change the caller's password; every other browser session is signed out."""
    user_service.change_password(
        session,
        settings,
        principal.user,
        current_password=body.current_password,
        new_password=body.new_password,
        keep_session_id=principal.session.id if principal.session else None,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("", response_model=list[UserRead], responses={404: {"model": ErrorResponse}})
def list_users(_admin: AdminUser, session: SessionDep) -> list[UserRead]:
    """Every account (admins only)."""
    return [UserRead.model_validate(user) for user in user_service.list_users(session)]


@router.post(
    "",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def create_user(body: UserCreate, _admin: AdminUser, session: SessionDep, settings: SettingsDep) -> UserRead:
    """Create an account (admins only)."""
    user = user_service.create_user(session, settings, body.username, body.password, body.role)
    return UserRead.model_validate(user)


@router.get("/{user_id}", response_model=UserRead, responses={404: {"model": ErrorResponse}})
def read_user(user_id: int, _admin: AdminUser, session: SessionDep) -> UserRead:
    """One account (admins only)."""
    return UserRead.model_validate(user_service.get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserRead, responses={404: {"model": ErrorResponse}})
def update_user(user_id: int, body: UserUpdate, admin: AdminUser, session: SessionDep) -> UserRead:
    """Deactivate or reactivate an account, or change its role (admins only).

    Deactivation revokes all the account's sessions and tokens immediately.
    """
    user = user_service.get_user(session, user_id)
    if body.role is not None and body.role != user.role:
        if user.id == admin.id:
            raise Invalid("You cannot change your own role.")
        user.role = body.role
    if body.is_active is False and user.is_active:
        user_service.deactivate_user(session, user, acting_user=admin)
    elif body.is_active is True and not user.is_active:
        user_service.reactivate_user(session, user)
    session.flush()
    return UserRead.model_validate(user)
