"""ASGI middleware of the web process: the request body limit and the last-resort 500.

Request bodies: JSON and form bodies are small, so every request body is limited to
``settings.max_request_body_bytes``, checked twice: a declared ``Content-Length`` over the limit is
answered 413 before a byte of the body is read, and the chunks of a body sent without a length
(chunked transfer) are counted as the application reads them, so at most one chunk past the limit
is ever read. Streamed uploads (dataset archives, backbone weights) are the exception: a route
that reads its body as a stream and enforces its own limits (``max_upload_bytes``...) is exempted
by listing its path prefix in :data:`STREAMED_BODY_PATH_PREFIXES` (or, for a POST under a route
whose other bodies stay limited, its exact path in :data:`STREAMED_BODY_PATHS`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Path prefixes of the routes that stream their request body and apply their own size limits.
#: Every other body is held to ``max_request_body_bytes``. ``/api/v1/datasets``: the dataset upload
#: (``max_upload_bytes`` and the quota); its other routes take no body. ``/api/v1/backbones``: only
#: its POST (the weights upload, ``max_weights_upload_bytes``) has a body; a JSON route added under
#: either must bound its own body or move the entry to the upload's path.
STREAMED_BODY_PATH_PREFIXES: tuple[str, ...] = ("/api/v1/datasets", "/api/v1/backbones")
#: Exact paths (patterns) of other streamed uploads: an image to predict on, POSTed to
#: ``/api/v1/tasks/<id>/predictions`` (``max_prediction_upload_bytes``).
STREAMED_BODY_PATHS: tuple[re.Pattern[str], ...] = (re.compile(r"/api/v1/tasks/\d{1,18}/predictions"),)

TOO_LARGE_CODE = "too_large"


def too_large_detail(limit: int) -> str:
    """The message of a 413, naming the limit."""
    return f"The request body is larger than the {limit} bytes accepted here."


class BodyLimitMiddleware:
    """Answers 413 to request bodies over ``max_bytes``, without reading more than that."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        exempt_prefixes: tuple[str, ...] = STREAMED_BODY_PATH_PREFIXES,
        exempt_paths: tuple[re.Pattern[str], ...] = STREAMED_BODY_PATHS,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = exempt_prefixes
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length up front, then count what the application reads."""
        path = scope.get("path", "")
        if scope["type"] != "http" or (
            (self.exempt_prefixes and path.startswith(self.exempt_prefixes))
            or (scope.get("method") == "POST" and any(p.fullmatch(path) for p in self.exempt_paths))
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            # The body is never read: close the connection rather than drain it.
            response = JSONResponse(
                {"error": TOO_LARGE_CODE, "detail": too_large_detail(self.max_bytes)},
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised where the body is read (FastAPI's parsing, a form): the application's
                    # HTTP error handler turns it into the usual JSON error or error page.
                    raise HTTPException(
                        413, detail=too_large_detail(self.max_bytes), headers={"Connection": "close"}
                    )
            return message

        await self.app(scope, limited_receive, send)


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class UnhandledErrorMiddleware:
    """Turns an exception that escaped every route and handler into the 500 response, and ends there.

    Starlette's own last-resort handler re-raises the exception after sending its response, and
    uvicorn then closes the keep-alive connection under the client's next request (ECONNRESET).
    Here the exception is logged by ``handler`` and the connection stays usable. Only when the
    response had already started (a failure mid-stream) is it re-raised, because then the server
    must close the connection to signal a truncated response.
    """

    def __init__(self, app: ASGIApp, handler: ErrorHandler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; answer 500 if it raises before responding."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await self.handler(Request(scope, receive), exc)
            await response(scope, receive, send)
