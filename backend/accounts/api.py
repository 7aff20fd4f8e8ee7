"""Account routes under /api/v1: the OAuth2 password flow, users, personal tokens and sessions.

Routes parse, call one service function, and return; the request owns the transaction.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from backend import paths  # noqa: F401  (registers the ``row_id`` path convertor)
from backend.accounts import login, sessions, tokens, users
from backend.accounts.schemas import (
    AccessToken,
    PasswordChange,
    SessionRead,
    TokenCreate,
    TokenCreated,
    TokenRead,
    UserCreate,
    UserRead,
    UserUpdate,
)
from backend.deps import AdminUser, CurrentUser, PrincipalDep, RowId, SessionDep, SessionId, SettingsDep
from backend.errors import ErrorResponse

auth_router = APIRouter(prefix="/auth", tags=["auth"])


@auth_router.post(
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
    user = login.authenticate(session, settings, form.username, form.password, ip=ip)
    issued = tokens.issue_access_token(session, settings, user)
    return AccessToken(access_token=issued.plaintext, expires_in=settings.access_token_max_age_seconds)


users_router = APIRouter(prefix="/users", tags=["users"], responses={401: {"model": ErrorResponse}})


@users_router.get("/me", response_model=UserRead)
async def read_me(user: CurrentUser) -> UserRead:
    """The account the request is authenticated as."""
    # No I/O: the user was loaded by authentication (and sessions do not expire on commit).
    return UserRead.model_validate(user)


@users_router.put(
    "/me/password", status_code=status.HTTP_204_NO_CONTENT, responses={400: {"model": ErrorResponse}}
)
def change_my_password(
    body: PasswordChange, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """Change the caller's password.

    Every other browser session and every password-flow access token (`tsa_`) is revoked; the
    credential making this request and the personal tokens (`tsr_`) keep working (revoke those
    one by one with `DELETE /api/v1/tokens/{id}`). `tessera user set-password` revokes them all.
    """
    users.change_password(
        session,
        settings,
        principal.user,
        current_password=body.current_password,
        new_password=body.new_password,
        keep_session_id=principal.session.id if principal.session else None,
        keep_token_id=principal.token.id if principal.token else None,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@users_router.get("", response_model=list[UserRead], responses={404: {"model": ErrorResponse}})
def list_users(_admin: AdminUser, session: SessionDep) -> list[UserRead]:
    """Every account (admins only)."""
    return [UserRead.model_validate(user) for user in users.list_users(session)]


@users_router.post(
    "",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def create_user(body: UserCreate, _admin: AdminUser, session: SessionDep, settings: SettingsDep) -> UserRead:
    """Create an account (admins only)."""
    user = users.create_user(session, settings, body.username, body.password, body.role)
    return UserRead.model_validate(user)


# ":row_id" (backend.paths): /users/me is never taken for an id, so PATCH /users/me is a 405.
@users_router.get("/{user_id:row_id}", response_model=UserRead, responses={404: {"model": ErrorResponse}})
def read_user(user_id: RowId, _admin: AdminUser, session: SessionDep) -> UserRead:
    """One account (admins only)."""
    return UserRead.model_validate(users.get_user(session, user_id))


@users_router.patch("/{user_id:row_id}", response_model=UserRead, responses={404: {"model": ErrorResponse}})
def update_user(user_id: RowId, body: UserUpdate, admin: AdminUser, session: SessionDep) -> UserRead:
    """Deactivate or reactivate an account, or change its role (admins only).

    Deactivation revokes all the account's sessions and tokens immediately.
    """
    user = users.update_user(
        session, users.get_user(session, user_id), acting_user=admin, role=body.role, is_active=body.is_active
    )
    return UserRead.model_validate(user)


tokens_router = APIRouter(prefix="/tokens", tags=["tokens"], responses={401: {"model": ErrorResponse}})


@tokens_router.get("", response_model=list[TokenRead])
def list_tokens(user: CurrentUser, session: SessionDep) -> list[TokenRead]:
    """The caller's tokens that still work, personal and password-flow (`kind`), prefixes only.

    Either kind can be revoked with `DELETE /api/v1/tokens/{id}`.
    """
    return [TokenRead.model_validate(row) for row in tokens.list_live_tokens(session, user)]


@tokens_router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, user: CurrentUser, session: SessionDep) -> TokenCreated:
    """Create a personal token; the response is the only time its secret is shown."""
    issued = tokens.create_personal_token(session, user, body.name)
    return TokenCreated(**TokenRead.model_validate(issued.row).model_dump(), token=issued.plaintext)


@tokens_router.delete(
    "/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}
)
def revoke_token(token_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """Revoke one of the caller's tokens (personal or password-flow); it stops working at once."""
    tokens.revoke_token(session, user, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


sessions_router = APIRouter(prefix="/sessions", tags=["sessions"], responses={401: {"model": ErrorResponse}})


@sessions_router.get("", response_model=list[SessionRead])
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
        for row in sessions.list_active_sessions(session, principal.user)
    ]


@sessions_router.delete(
    "/{session_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}
)
def revoke_session(session_id: SessionId, principal: PrincipalDep, session: SessionDep) -> Response:
    """Sign one of the caller's sessions out; another user's session is 404."""
    sessions.revoke_user_session(session, principal.user, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


router = APIRouter()
for _router in (auth_router, users_router, tokens_router, sessions_router):
    router.include_router(_router)
