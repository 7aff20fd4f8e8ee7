"""The FastAPI application: ``create_app()`` wires routers, middleware and error handlers.

Run with ``uvicorn --factory backend.main:create_app`` (``tessera serve`` does this).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import operations
from backend.accounts import api as accounts_api
from backend.accounts import views as accounts_views
from backend.accounts.login import Viewer, resolve_principal
from backend.backbones import api as backbones_api
from backend.backbones import views as backbones_views
from backend.config import Settings, get_settings
from backend.datasets import api as datasets_api
from backend.datasets import views as datasets_views
from backend.db import session_scope
from backend.errors import AppError, ErrorResponse, Unauthorized
from backend.limits import ConcurrencyLimitMiddleware, configure_threads, freeze_startup_heap
from backend.middleware import TOO_LARGE_CODE, BodyLimitMiddleware, UnhandledErrorMiddleware
from backend.observability import HttpMetrics, ObservabilityMiddleware, configure_logging
from backend.route_filter import install_route_prefilter
from backend.training import api as training_api
from backend.training import views as training_views
from backend.ui import views as ui_views
from backend.ui.templating import STATIC_DIR, is_htmx, render
from backend.workers import api as workers_api
from backend.workers import views as workers_views

logger = logging.getLogger(__name__)

#: Every JSON API route lives under this prefix (one version today).
API_PREFIX = "/api/v1"

OPENAPI_TAGS = [
    {"name": "auth", "description": "OAuth2 password flow: get a short-lived bearer token."},
    {"name": "users", "description": "Your account; account administration (admins)."},
    {"name": "tokens", "description": "Personal API tokens (shown once, stored hashed)."},
    {"name": "sessions", "description": "Your signed-in browsers."},
    {"name": "datasets", "description": "Upload datasets; a worker validates them."},
    {"name": "backbones", "description": "Built-in backbones and your uploaded weights."},
    {"name": "operations", "description": "Health check and Prometheus metrics."},
]
_STATUS_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: TOO_LARGE_CODE,
}
_STATUS_TITLES = {
    400: "That did not work",
    401: "Please sign in",
    403: "Not allowed",
    404: "Page not found",
    405: "Not allowed",
    409: "Already exists",
    413: "Too large",
    422: "Please check the form",
    429: "Too many attempts",
    500: "Something went wrong",
}
_JSON_PATH_PREFIXES = (API_PREFIX, "/healthz", "/metrics", "/openapi.json")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
#: A validation error repeats at most this much of the offending value (never a whole large body).
MAX_ECHOED_INPUT_CHARS = 200


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
        "ui/error.html",
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


@functools.cache
def _path_template_regex(template: str) -> re.Pattern[str]:
    literal_parts = re.split(r"\{[^/}]+\}", template)
    return re.compile("[^/]+".join(re.escape(part) for part in literal_parts))


def _documented_methods(request: Request) -> list[str] | None:
    """The methods the OpenAPI schema documents for the request's path (a literal path such as
    ``/users/me`` wins over a template such as ``/users/{user_id}``), or None for undocumented paths."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    for template in sorted(paths, key=lambda t: (t.count("{"), t)):
        if _path_template_regex(template).fullmatch(request.url.path):
            return sorted(method.upper() for method in paths[template] if method.upper() in _HTTP_METHODS)
    return None


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        detail = "There is nothing at this address."
    if exc.status_code == 405:
        # The router names only the first route that matched the path; list every method of the path.
        methods = _documented_methods(request)
        if methods:
            headers["Allow"] = ", ".join(methods)
    return _error_response(request, exc.status_code, code, detail, headers)


def _bounded_input(error: dict[str, Any]) -> dict[str, Any]:
    """``error`` with its ``input`` cut to :data:`MAX_ECHOED_INPUT_CHARS` (a long string is truncated,
    a large object or list is left out), so a 422 never echoes a large request back."""
    if "input" not in error:
        return error
    bounded = dict(error)
    value = jsonable_encoder(error["input"])
    if isinstance(value, str):
        if len(value) > MAX_ECHOED_INPUT_CHARS:
            bounded["input"] = value[:MAX_ECHOED_INPUT_CHARS] + "…"
    elif len(json.dumps(value, default=str)) > MAX_ECHOED_INPUT_CHARS:
        del bounded["input"]
    else:
        bounded["input"] = value
    return bounded


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if wants_json(request):
        errors = [_bounded_input(error) for error in exc.errors()]
        return _error_response(request, 422, "validation_error", errors, {})
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


def _document_common_responses(app: FastAPI) -> None:
    """Add to the OpenAPI schema the answers every operation with a request body can give, besides
    its own: 400 (the body is not valid JSON or form data) and 413 (over ``max_request_body_bytes``).
    Operations added later are covered without repeating them on each route."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build_schema()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "ErrorResponse", ErrorResponse.model_json_schema()
        )
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "requestBody" not in operation:
                    continue
                responses = operation.setdefault("responses", {})
                responses.setdefault(
                    "400",
                    {"description": "The body could not be parsed, or was refused.", "content": error},
                )
                responses.setdefault("413", {"description": "The body is too large.", "content": error})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Tessera web application for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """Prepare what the first requests would otherwise race for."""
        settings.resolved_secret_key()  # create the key file before the first request races for it
        configure_threads(settings.web_concurrency)
        if settings.web_gc_freeze:
            frozen = freeze_startup_heap()
            logger.debug("froze %d start-up objects out of the garbage collector's full passes", frozen)
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
    # Outermost last: request ids, headers and metrics see every response, the 500s included; the
    # concurrency limit runs inside the observability middleware, so logged latencies include the wait.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(UnhandledErrorMiddleware, handler=_unexpected_error_handler)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.web_concurrency)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    # One API router and one page router per domain; operations (health, metrics) stay outside /api/v1.
    for api_router in (
        accounts_api.router,
        datasets_api.router,
        backbones_api.router,
        training_api.router,
        workers_api.router,
    ):
        app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(operations.router)
    for page_router in (
        accounts_views.router,
        datasets_views.router,
        backbones_views.router,
        training_views.router,
        workers_views.router,
        ui_views.router,
    ):
        app.include_router(page_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _document_common_responses(app)
    # Last, once every route is in place: each router is asked only about paths it can match.
    install_route_prefilter(app)
    return app
