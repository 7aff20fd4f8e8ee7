"""Request logging, Prometheus metrics, request ids and security headers, as one ASGI middleware."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.config import Settings

request_logger = logging.getLogger("tessera.request")

REQUEST_ID_HEADER = "X-Request-ID"
# Accept a caller's request id only if it is short and plain, so it cannot forge log lines.
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNMATCHED_ROUTE = "<unmatched>"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI sets inline style attributes; only the API docs page is allowed them.
DOCS_CONTENT_SECURITY_POLICY = CONTENT_SECURITY_POLICY.replace(
    "style-src 'self'", "style-src 'self' 'unsafe-inline'"
)
DOCS_PATH = "/docs"
#: Static files keep their own caching; every other response (API, pages, errors) may carry secrets
#: or per-user content and is never stored by browsers or proxies.
STATIC_PATH_PREFIX = "/static/"
NO_STORE = "no-store"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_RECORD_FIELDS = ("method", "path", "route", "status", "duration_ms", "request_id", "client")


class HttpMetrics:
    """Prometheus collectors of one application, in their own registry (so several apps can coexist)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tessera_http_requests_total",
            "HTTP requests handled, by method, route template and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "tessera_http_request_duration_seconds",
            "Time to produce the response, by method and route template.",
            ("method", "route"),
            registry=self.registry,
        )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the request fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialise ``record`` as a JSON line."""
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _RECORD_FIELDS:
            if hasattr(record, field):
                payload[field] = getattr(record, field)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


_HANDLER_NAME = "tessera"


def configure_logging(settings: Settings) -> None:
    """Install one stderr handler on the root logger (text or JSON lines), replacing a previous one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if settings.log_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def route_template(scope: Scope) -> str:
    """The matched route's template (``/api/v1/tokens/{token_id}``), or ``<unmatched>``.

    Rebuilt from the matched path parameters, because with nested routers the route object only
    knows its path relative to its router.
    """
    if scope.get("endpoint") is None and scope.get("route") is None:
        return UNMATCHED_ROUTE
    app_root = scope.get("app_root_path", "")
    mount_prefix = scope.get("root_path", "")[len(app_root) :]
    if mount_prefix:
        # A mounted app (static files): one label for everything below the mount point.
        return f"{mount_prefix}/{{path}}"
    path: str = scope.get("path", "")
    params = scope.get("path_params") or {}
    for name, value in params.items():
        segment = f"/{value}"
        index = path.rfind(segment)
        if index >= 0:
            path = f"{path[:index]}/{{{name}}}{path[index + len(segment) :]}"
    return path


class ObservabilityMiddleware:
    """Gives every request an id, adds security headers, records metrics and logs one line per request.

    Security headers include ``Cache-Control: no-store`` on every response outside ``/static/``
    (tokens, the settings page, any signed-in page), unless a route sets its own.

    Metrics use the route *template* (``/api/v1/tokens/{token_id}``), never the raw path, so label
    cardinality stays bounded.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wrap one HTTP request; other ASGI events pass through untouched."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = (
            dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        )
        request_id = incoming if _REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        csp = DOCS_CONTENT_SECURITY_POLICY if scope.get("path") == DOCS_PATH else CONTENT_SECURITY_POLICY
        cacheable = scope.get("path", "").startswith(STATIC_PATH_PREFIX)

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers.setdefault("Content-Security-Policy", csp)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if not cacheable:
                    headers.setdefault("Cache-Control", NO_STORE)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            duration = time.perf_counter() - started
            route = route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(duration)
            client = scope.get("client")
            request_logger.info(
                "%s %s %s %.1fms",
                method,
                scope.get("path", ""),
                status,
                duration * 1000,
                extra={
                    "method": method,
                    "path": scope.get("path", ""),
                    "route": route,
                    "status": status,
                    "duration_ms": round(duration * 1000, 2),
                    "request_id": request_id,
                    "client": client[0] if client else "",
                },
            )
