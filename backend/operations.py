"""Operational endpoints: health check and Prometheus metrics (outside /api/v1).

``/healthz`` is anonymous. ``/metrics`` is anonymous unless ``TESSERA_METRICS_TOKEN`` is set, in
which case it needs ``Authorization: Bearer <that token>``; without a token, keep it reachable
only from the monitoring network (bind Tessera behind the reverse proxy and do not route /metrics).
"""

from __future__ import annotations

import hmac
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from backend.config import Settings
from backend.db import get_engine
from backend.deps import SettingsDep
from backend.errors import ErrorResponse, Unauthorized
from backend.queue import broker_reachable_cached

router = APIRouter(tags=["operations"])


DatabaseState = Literal["ok", "not_writable", "unreachable"]


def _database_state(settings: Settings) -> DatabaseState:
    """``ok`` when the database answers and accepts writes; ``not_writable`` when it answers but a
    write fails (a read-only file or transaction, an unmigrated schema); else ``unreachable``.

    The write is a no-op update of Alembic's one-row version table inside a transaction that is
    rolled back, so it changes nothing, yet fails like a sign-in would on a read-only file or a
    read-only Postgres transaction.
    """
    try:
        with get_engine(settings).connect() as connection:
            connection.execute(text("SELECT 1"))
            connection.rollback()
            try:
                with connection.begin() as transaction:
                    connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
                    transaction.rollback()
            except Exception:  # the message is not exposed to anonymous callers
                return "not_writable"
        return "ok"
    except Exception:  # any failure means "down"; the message is not exposed to anonymous callers
        return "unreachable"


class Health(BaseModel):
    """``status`` is ``ok`` (200) or ``unavailable``/``degraded`` (503; degraded: the database
    answers but refuses writes)."""

    status: Literal["ok", "degraded", "unavailable"]
    database: DatabaseState
    broker: Literal["ok", "unreachable"]


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(settings: SettingsDep) -> JSONResponse:
    """Database and broker status: 200 when both answer and the database accepts writes, 503 otherwise.

    Async so that a slow broker never holds a request thread: the broker probe runs in its own
    thread, one at a time, and this waits for it at most about the configured timeout.
    """
    database = await run_in_threadpool(_database_state, settings)
    broker = await broker_reachable_cached(settings, timeout=settings.health_broker_timeout_seconds)
    if database == "unreachable" or not broker:
        status = "unavailable"
    elif database == "not_writable":
        status = "degraded"
    else:
        status = "ok"
    body = {"status": status, "database": database, "broker": "ok" if broker else "unreachable"}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


def _metrics_token_ok(settings: Settings, authorization: str | None) -> bool:
    if not settings.metrics_token:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), settings.metrics_token.encode())


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Request counts and latencies in the Prometheus text exposition format.",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        401: {"model": ErrorResponse, "description": "TESSERA_METRICS_TOKEN is set and was not sent."},
    },
)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Request counts and latencies in the Prometheus text format (a bearer token when configured)."""
    if not _metrics_token_ok(settings, request.headers.get("authorization")):
        raise Unauthorized("This endpoint needs the metrics token.", headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
