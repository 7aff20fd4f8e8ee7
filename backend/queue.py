"""Celery client used by the API: sends tasks by name, after the database commit.

This module never imports the worker package or torch. Task and queue names are declared here,
once: the worker registers its tasks under these names (``worker.tasks``) and the web process sends
by them. The message carries ids only; the database row is the truth.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu import Connection
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db import run_after_commit

logger = logging.getLogger(__name__)

#: Queue every task goes to unless a route says otherwise. It is Celery's own default name, so
#: a client with Celery's defaults reaches the same workers.
DEFAULT_QUEUE = "celery"
#: Queue of short jobs (validating an upload, measuring a backbone) that must not wait behind a
#: training run; every worker consumes it unless started with ``-Q`` for one queue only.
LIGHT_QUEUE = "tessera.light"
#: Queue that ``/healthz`` declares to prove a real round trip to the broker; no worker reads it.
HEALTH_QUEUE = "tessera.health"

#: Task names, sent by the web process and registered by the worker.
SYSTEM_PING = "system.ping"
ACCOUNTS_PRUNE = "accounts.prune"
BACKBONES_VALIDATE = "backbones.validate"
BACKBONES_MEASURE = "backbones.measure"

#: The queue of each task that does not go to :data:`DEFAULT_QUEUE` (Celery ``task_routes``,
#: applied by the web process's client and by the worker alike).
TASK_ROUTES: dict[str, dict[str, str]] = {
    BACKBONES_VALIDATE: {"queue": LIGHT_QUEUE},
    BACKBONES_MEASURE: {"queue": LIGHT_QUEUE},
}


@lru_cache
def _client(broker_url: str) -> Celery:
    app = Celery("tessera-client", broker=broker_url)
    app.conf.update(
        task_ignore_result=True, broker_connection_retry_on_startup=False, task_routes=TASK_ROUTES
    )
    return app


def celery_client(settings: Settings) -> Celery:
    """The process-wide Celery client for ``settings.broker_url``."""
    return _client(settings.broker_url)


def enqueue(settings: Settings, name: str, *args: Any) -> None:
    """Send task ``name`` with positional ``args`` now. Call only after the data it needs is committed."""
    celery_client(settings).send_task(name, args=list(args))
    logger.info("enqueued %s %s", name, args)


def enqueue_after_commit(session: Session, settings: Settings, name: str, *args: Any) -> None:
    """Send task ``name`` once the session's transaction commits; nothing is sent if it rolls back.

    Sending before the commit would let a fast worker look for a row that does not exist yet.
    """
    run_after_commit(session, lambda: enqueue(settings, name, *args))


def broker_reachable(settings: Settings, timeout: float) -> bool:
    """True when a connection to the broker can be opened within ``timeout`` seconds (for /healthz)."""
    try:
        with Connection(
            settings.broker_url, connect_timeout=timeout, transport_options={"max_retries": 0}
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            # Declaring a queue is a real round trip on every transport (the SQL one connects lazily).
            conn.default_channel.queue_declare(queue=HEALTH_QUEUE, passive=False)
            return True
    except Exception as exc:  # any failure means "not reachable"; the reason goes to the log
        logger.warning("broker not reachable: %s", exc)
        return False
