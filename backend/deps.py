"""Dependencies shared by API and page routes, as ``Annotated`` aliases.

``CurrentUser`` authenticates the caller (bearer token or session cookie) and, for unsafe methods
authenticated by the cookie, enforces the CSRF token before the route runs, so a rejected request
changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Path, Request, Security
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from backend import csrf
from backend.accounts.login import Principal, Viewer, resolve_principal
from backend.config import Settings
from backend.db import end_transaction, get_sessionmaker
from backend.errors import Forbidden, NotFound, Unauthorized
from backend.models import SESSION_ID_LENGTH, User

#: Largest id an ``Integer`` primary key holds on every database (Postgres' ``integer`` is 32-bit;
#: SQLite's is 64-bit); larger path ids are a 422, never a 500.
MAX_ROW_ID = 2**31 - 1

#: A row id in a path (``/tokens/{token_id}``): a positive integer the id columns can hold.
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
#: A browser session id in a path: the hex SHA-256 the session row is keyed by.
SessionId = Annotated[str, Path(min_length=1, max_length=SESSION_ID_LENGTH)]


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in a
# worker thread, and every such hop costs CPU and a handoff of the GIL between the event loop and
# a thread, which is what a request's tail latency is made of under load (docs/benchmarks.md).
async def get_app_settings(request: Request) -> Settings:
    """The settings the application was created with."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One database session per request, committed at the end or rolled back on error.

    Opening a session does no I/O (it connects on first use), so it happens on the event loop.
    At the end, the commit or rollback runs in a worker thread only when the session holds a
    transaction or unflushed changes; a request whose work was already committed (authentication
    ends its own transaction) closes without a thread hop.
    """
    session = get_sessionmaker(request.app.state.settings)()
    try:
        yield session
    except BaseException:
        if _holds_work(session):
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(_rollback_and_close, session)
        else:
            session.close()
        raise
    if _holds_work(session):
        await run_in_threadpool(_commit_and_close, session)
    else:
        session.close()


def _holds_work(session: Session) -> bool:
    """Whether ending ``session`` needs the database: an open transaction or unflushed changes."""
    return bool(session.in_transaction() or session.new or session.dirty or session.deleted)


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _rollback_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


# scope="function": commit before the response is sent, so a failed commit is never reported as success.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# Declares the bearer scheme in OpenAPI (the "Authorize" button of /docs); the header itself is
# read by resolve_principal, which also accepts the session cookie.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def get_optional_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _bearer: Annotated[str | None, Security(oauth2_scheme)] = None,
) -> Principal | None:
    """Who is calling, or None for anonymous requests (a plain snapshot is kept for page templates)."""
    principal = resolve_principal(
        session,
        settings,
        authorization=request.headers.get("authorization"),
        session_cookie=request.cookies.get(settings.session_cookie_name),
    )
    request.state.viewer = Viewer.of(principal) if principal else None
    # Authentication is its own short transaction: the connection goes back to the pool before
    # the endpoint waits for its thread.
    end_transaction(session)
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(get_optional_principal)]


async def require_principal(request: Request, principal: OptionalPrincipal) -> Principal:
    """The authenticated caller; unsafe cookie-authenticated requests must carry the session's CSRF token.

    The token is looked for in the ``X-CSRF-Token`` header first and only then in a form body;
    endpoints that stream their request body themselves (large uploads) must therefore be sent
    with the header, so that the check never consumes the stream.
    """
    if principal is None:
        raise Unauthorized(headers={"WWW-Authenticate": "Bearer"})
    if request.method not in csrf.SAFE_METHODS and principal.session is not None:
        submitted = await csrf.submitted_token(request)
        if not csrf.matches(principal.session.csrf_secret, submitted):
            raise Forbidden(
                "The form has expired or did not come from Tessera (missing or invalid CSRF token). "
                "Reload the page and try again."
            )
    return principal


PrincipalDep = Annotated[Principal, Depends(require_principal)]


async def get_current_user(principal: PrincipalDep) -> User:
    """The authenticated, active user."""
    return principal.user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> User:
    """The current user if an administrator; others get 404 so admin objects stay invisible to them."""
    if not user.is_admin:
        raise NotFound()
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]
