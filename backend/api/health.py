"""Operational endpoints: health check and Prometheus metrics (outside /api/v1, unauthenticated)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from backend.api.deps import SettingsDep
from backend.config import Settings
from backend.db import get_engine
from backend.queue import broker_reachable_cached

router = APIRouter(tags=["operations"])


def _database_ok(settings: Settings) -> bool:
    try:
        with get_engine(settings).connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:  # any failure means "down"; the message is not exposed to anonymous callers
        return False


@router.get("/healthz")
async def healthz(settings: SettingsDep) -> JSONResponse:
    """Database and broker status: 200 when both answer, 503 otherwise.

    Async so that a slow broker never holds a request thread: the broker probe runs in its own
    thread, one at a time, and this waits for it at most about the configured timeout.
    """
    database = await run_in_threadpool(_database_ok, settings)
    broker = await broker_reachable_cached(settings, timeout=settings.health_broker_timeout_seconds)
    healthy = database and broker
    body = {
        "status": "ok" if healthy else "unavailable",
        "database": "ok" if database else "unreachable",
        "broker": "ok" if broker else "unreachable",
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Request counts and latencies in the Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
