"""The FastAPI application: ``create_app()`` wires routers, middleware and error handlers.

Run with ``uvicorn --factory backend.main:create_app`` (``tessera serve`` does this).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.api import API_PREFIX, build_api_router, health
from backend.config import Settings, get_settings
from backend.db import session_scope
from backend.errors import AppError, Unauthorized
from backend.limits import ConcurrencyLimitMiddleware, configure_threads
from backend.observability import HttpMetrics, ObservabilityMiddleware, configure_logging
from backend.services.auth import Viewer, resolve_principal
from backend.web import build_web_router
from backend.web.templating import STATIC_DIR, is_htmx, render

logger = logging.getLogger(__name__)

OPENAPI_TAGS = [
    {"name": "auth", "description": "OAuth2 password flow: get a short-lived bearer token."},
    {"name": "users", "description": "Your account; account administration (admins)."},
    {"name": "tokens", "description": "Personal API tokens (shown once, stored hashed)."},
    {"name": "sessions", "description": "Your signed-in browsers."},
    {"name": "operations", "description": "Health check and Prometheus metrics."},
]
_STATUS_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}
_STATUS_TITLES = {
    400: "That did not work",
    401: "Please sign in",
    403: "Not allowed",
    404: "Page not found",
    405: "Not allowed",
    409: "Already exists",
    422: "Please check the form",
    429: "Too many attempts",
    500: "Something went wrong",
}
_JSON_PATH_PREFIXES = (API_PREFIX, "/healthz", "/metrics", "/openapi.json")


def _app_version() -> str:
    try:
        return version("tessera")
    except PackageNotFoundError:
        return "0.0.0"


def wants_json(request: Request) -> bool:
    """API paths (and clients that ask for JSON rather than HTML) get JSON errors; browsers get pages."""
    if request.url.path.startswith(_JSON_PATH_PREFIXES):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _identify_viewer(request: Request) -> None:
    """Recognise a signed-in browser on pages no route handled (404s), so the layout shows its menu."""
    if hasattr(request.state, "viewer"):
        return
    request.state.viewer = None
    settings: Settings = request.app.state.settings
    try:
        with session_scope(settings) as session:
            principal = resolve_principal(
                session,
                settings,
                authorization=None,
                session_cookie=request.cookies.get(settings.session_cookie_name),
            )
            request.state.viewer = Viewer.of(principal) if principal else None
    except Exception:  # an error page must render even when the database is the problem
        logger.warning("could not identify the viewer of an error page", exc_info=True)


def _error_response(
    request: Request, status_code: int, code: str, detail: object, headers: dict[str, str]
) -> Response:
    if wants_json(request):
        return JSONResponse(
            {"error": code, "detail": jsonable_encoder(detail)}, status_code=status_code, headers=headers
        )
    message = detail if isinstance(detail, str) else "The request could not be processed."
    if status_code == 401:
        login = f"/login?next={quote(request.url.path)}"
        if is_htmx(request):
            return Response(status_code=204, headers={"HX-Redirect": login})
        return RedirectResponse(login, status_code=303)
    title = _STATUS_TITLES.get(status_code, "Something went wrong")
    _identify_viewer(request)
    if is_htmx(request):
        toast_headers = {**headers, "HX-Retarget": "#toasts", "HX-Reswap": "beforeend"}
        return render(
            request,
            "partials/toast.html",
            {"level": "error", "text": message},
            status_code=status_code,
            headers=toast_headers,
        )
    return render(
        request,
        "pages/error.html",
        {"status_code": status_code, "title": title, "message": message},
        status_code=status_code,
        headers=headers,
    )


async def _app_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    headers = dict(exc.headers)
    if isinstance(exc, Unauthorized) and wants_json(request):
        headers.setdefault("WWW-Authenticate", "Bearer")
    return _error_response(request, exc.status_code, exc.code, exc.detail, headers)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail
    if exc.status_code == 404:
        detail = "There is nothing at this address."
    return _error_response(request, exc.status_code, code, detail, dict(exc.headers or {}))


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if wants_json(request):
        return _error_response(request, 422, "validation_error", exc.errors(), {})
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error.get('loc', ())[1:]) or 'request'}: {error.get('msg', 'invalid')}"
        for error in exc.errors()
    )
    return _error_response(request, 422, "validation_error", problems, {})


async def _unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(
        request, 500, "internal_error", "Something went wrong on our side. It has been logged.", {}
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Tessera web application for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """Prepare what the first requests would otherwise race for."""
        settings.resolved_secret_key()  # create the key file before the first request races for it
        configure_threads(settings.web_concurrency)
        yield

    app = FastAPI(
        title="Tessera",
        version=_app_version(),
        description="Train vision models on very large images under a GPU memory budget, with PatchGD.",
        openapi_tags=OPENAPI_TAGS,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = HttpMetrics()
    # Added first, so it runs inside the observability middleware: logged latencies include the wait.
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.web_concurrency)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
    app.include_router(build_api_router())
    app.include_router(health.router)
    app.include_router(build_web_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
