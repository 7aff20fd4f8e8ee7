"""Celery client used by the API: sends tasks by name, after the database commit.

This module never imports the worker package or torch. Task and queue names are declared here,
once: the worker registers its tasks under these names (``worker.tasks``) and the web process sends
by them. The message carries ids only; the database row is the truth.

Dispatch contract (what callers may rely on):

* Every call to the broker from the web process is bounded: connecting, each socket read and
  write, and one publish retry all time out after ``Settings.broker_timeout_seconds``. A broker
  that accepts connections and never answers costs a request a few seconds, never a thread
  forever.
* :func:`enqueue` never raises because of the broker. It returns a :class:`Dispatch`; when
  ``dispatched`` is false the message was not sent and ``reason`` says why (it is also logged).
* Work is sent only after the row it needs is committed (:func:`enqueue_after_commit`), so a
  broker failure never rolls back the request's transaction: the row stays in its pre-dispatch
  state (for example ``queued``) and a periodic re-dispatcher, which looks for rows left in that
  state, sends it again later. The row, not the message, says what must happen.
* ``/healthz`` asks :func:`broker_reachable_cached`: one probe at a time per broker (the other
  callers wait for its answer), its answer reused for :data:`HEALTH_CACHE_SECONDS`, and callers
  stop waiting after the timeout even if a transport ignored its own timeouts. At most one thread
  per broker URL is ever busy probing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
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
#: Queue of short jobs (validating an upload, measuring a backbone, demo data) that must not wait
#: behind a training run; every worker consumes it unless started with ``-Q`` for one queue only.
LIGHT_QUEUE = "tessera.light"
#: Queue of training runs (``training.train``); `tessera serve` runs a worker for it alone (one run at
#: a time) beside a light worker for the other queues; a GPU machine can do the same
#: (``-Q tessera.training``).
TRAINING_QUEUE = "tessera.training"
#: Queue that ``/healthz`` declares to prove a real round trip to the broker; no worker reads it.
HEALTH_QUEUE = "tessera.health"
#: How long a broker probe's answer is reused by /healthz (a burst of health checks probes once).
HEALTH_CACHE_SECONDS = 2.0
REDIS_SCHEMES = {"redis", "rediss", "sentinel"}


@dataclass(frozen=True)
class Dispatch:
    """What became of one enqueue: sent to the broker, or not (the row stays as it was)."""

    dispatched: bool
    reason: str = ""


def transport_options(broker_url: str, timeout: float) -> dict[str, Any]:
    """Broker transport options that bound every socket operation.

    Redis takes socket timeouts; other transports reject unknown options (the SQL one passes them
    to ``create_engine``), so they only get the retry bound. AMQP is bounded by the connect
    timeout and heartbeats.
    """
    options: dict[str, Any] = {"max_retries": 1}
    if broker_url.split(":", 1)[0] in REDIS_SCHEMES:
        options.update(socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False)
    return options


def retry_policy() -> dict[str, Any]:
    """A publish retries once, quickly; each try is bounded by the socket and connect timeouts."""
    return {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }


#: Task names, sent by the web process and registered by the worker.
SYSTEM_PING = "system.ping"
ACCOUNTS_PRUNE = "accounts.prune"
DATASETS_VALIDATE = "datasets.validate"
DATASETS_DEMO = "datasets.demo"
DATASETS_PRUNE_UPLOADS = "datasets.prune_uploads"
BACKBONES_VALIDATE = "backbones.validate"
BACKBONES_MEASURE = "backbones.measure"
#: Plan a run under a memory budget (both algorithms); on the light queue, so a plan is answered
#: while a training runs (the light worker sits on the same machine and device as the trainer).
MEMORY_PLAN = "memory.plan"
#: Train one task (its id); claimed from the row, so a duplicate message is harmless.
TRAINING_TRAIN = "training.train"
#: Export a finished task's model in one format (TorchScript, ONNX) on demand; default queue.
TRAINING_EXPORT = "training.export"
#: Predict one uploaded image with a finished task's model (a prediction id); light queue.
PREDICTIONS_RUN = "predictions.run"
#: Evaluate a finished task's model on another dataset (an evaluation id); light queue.
EVALUATIONS_RUN = "evaluations.run"
#: Periodic (Celery beat): requeue running tasks whose lease expired (or fail them after max attempts).
TRAINING_REAP = "training.reap"
#: Periodic (Celery beat): send again the tasks left queued too long (a lost or unsent message).
TRAINING_REDISPATCH = "training.redispatch"

#: Task name -> Celery route; tasks not listed go to :data:`DEFAULT_QUEUE`. The client and the
#: worker's Celery app both use it, so a task is sent to the queue its workers read.
TASK_ROUTES: dict[str, dict[str, str]] = {
    DATASETS_VALIDATE: {"queue": LIGHT_QUEUE},
    DATASETS_DEMO: {"queue": LIGHT_QUEUE},
    DATASETS_PRUNE_UPLOADS: {"queue": LIGHT_QUEUE},
    BACKBONES_VALIDATE: {"queue": LIGHT_QUEUE},
    BACKBONES_MEASURE: {"queue": LIGHT_QUEUE},
    MEMORY_PLAN: {"queue": LIGHT_QUEUE},
    TRAINING_TRAIN: {"queue": TRAINING_QUEUE},
    TRAINING_REAP: {"queue": LIGHT_QUEUE},
    TRAINING_REDISPATCH: {"queue": LIGHT_QUEUE},
    PREDICTIONS_RUN: {"queue": LIGHT_QUEUE},
    EVALUATIONS_RUN: {"queue": LIGHT_QUEUE},
}


@lru_cache
def _client(broker_url: str, timeout: float = 3.0) -> Celery:
    app = Celery("tessera-client", broker=broker_url)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=timeout,
        broker_connection_max_retries=1,
        broker_transport_options=transport_options(broker_url, timeout),
        task_publish_retry_policy=retry_policy(),
        task_routes=TASK_ROUTES,
    )
    return app


def celery_client(settings: Settings) -> Celery:
    """The process-wide Celery client for ``settings.broker_url``."""
    return _client(settings.broker_url, settings.broker_timeout_seconds)


def enqueue(settings: Settings, name: str, *args: Any) -> Dispatch:
    """Send task ``name`` with positional ``args`` now. Call only after the data it needs is committed.

    Returns within a few broker timeouts; a failure is reported as ``Dispatch(False, reason)``,
    never raised (see the module's dispatch contract).
    """
    try:
        celery_client(settings).send_task(name, args=list(args), retry=True, retry_policy=retry_policy())
    except Exception as exc:  # any broker failure: not dispatched; the database row stays the truth
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning("not dispatched %s %s: %s", name, args, reason)
        return Dispatch(dispatched=False, reason=reason)
    logger.info("enqueued %s %s", name, args)
    return Dispatch(dispatched=True)


def enqueue_after_commit(session: Session, settings: Settings, name: str, *args: Any) -> None:
    """Send task ``name`` once the session's transaction commits; nothing is sent if it rolls back.

    Sending before the commit would let a fast worker look for a row that does not exist yet. A
    broker that cannot be reached does not fail the (already committed) request: the message is
    simply not sent and the row waits for the re-dispatcher.
    """
    run_after_commit(session, lambda: enqueue(settings, name, *args))


def broker_reachable(settings: Settings, timeout: float) -> bool:
    """True when a connection to the broker can be opened within ``timeout`` seconds (for /healthz).

    Blocks the calling thread up to about ``timeout`` seconds per socket operation; the web
    process calls :func:`broker_reachable_cached` instead.
    """
    try:
        with Connection(
            settings.broker_url,
            connect_timeout=timeout,
            transport_options=transport_options(settings.broker_url, timeout),
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            # Declaring a queue is a real round trip on every transport (the SQL one connects lazily).
            conn.default_channel.queue_declare(queue=HEALTH_QUEUE, passive=False)
            return True
    except Exception as exc:  # any failure means "not reachable"; the reason goes to the log
        logger.warning("broker not reachable: %s", exc)
        return False


@dataclass
class _Probe:
    future: concurrent.futures.Future[bool]
    finished_at: float | None = None


_probes: dict[str, _Probe] = {}
_probes_lock = threading.Lock()


def _start_or_join_probe(settings: Settings, timeout: float) -> concurrent.futures.Future[bool]:
    """The running (or recently finished) probe of this broker, starting one if there is none."""
    url = settings.broker_url
    now = time.monotonic()
    with _probes_lock:
        probe = _probes.get(url)
        if probe is not None and (
            probe.finished_at is None or now - probe.finished_at < HEALTH_CACHE_SECONDS
        ):
            return probe.future
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        probe = _Probe(future=future)
        _probes[url] = probe

    def run() -> None:
        try:
            result = broker_reachable(settings, timeout)
        finally:
            with _probes_lock:
                probe.finished_at = time.monotonic()
        future.set_result(result)

    # Its own daemon thread: a probe stuck in a transport never occupies the request thread pool.
    threading.Thread(target=run, name="tessera-broker-probe", daemon=True).start()
    return future


async def broker_reachable_cached(settings: Settings, timeout: float) -> bool:
    """:func:`broker_reachable` for request handlers: single-flight, cached, and never waits past the bound.

    Does not block the event loop. Answers False when the probe has not finished within
    ``timeout`` plus a small margin (the probe may still be running; the next caller joins it).
    """
    future = _start_or_join_probe(settings, timeout)
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout * 1.5 + 0.5)
    except TimeoutError:
        logger.warning("broker probe did not finish within %.1f s", timeout)
        return False


# --------------------------------------------------------------------------- queue lengths

#: How long the broker's queue lengths are reused by the workers page (a burst of views asks once).
QUEUE_LENGTHS_CACHE_SECONDS = 2.0
#: The queues whose lengths the workers page shows.
WORK_QUEUES = (TRAINING_QUEUE, LIGHT_QUEUE, DEFAULT_QUEUE)


def broker_queue_lengths(settings: Settings, timeout: float) -> dict[str, int] | None:
    """Messages waiting in each of :data:`WORK_QUEUES` (None when the broker cannot tell).

    Redis and kombu's SQL transport count them; declaring a queue the workers declare anyway
    changes nothing. Blocks up to about ``timeout`` per socket operation: the web process calls
    :func:`broker_queue_lengths_cached`.
    """
    try:
        with Connection(
            settings.broker_url,
            connect_timeout=timeout,
            transport_options=transport_options(settings.broker_url, timeout),
        ) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            channel = conn.default_channel
            return {
                name: int(channel.queue_declare(queue=name, passive=False).message_count)
                for name in WORK_QUEUES
            }
    except Exception as exc:  # any failure: the page says the broker did not tell
        logger.warning("broker queue lengths not available: %s", exc)
        return None


_length_probes: dict[str, _Probe] = {}


def _single_flight(
    registry: dict[str, _Probe], key: str, work: Any, cache_seconds: float, name: str
) -> concurrent.futures.Future[Any]:
    """The running (or recently finished) call of ``work`` under ``key``, starting one if none.

    The call runs in a daemon thread of its own, so a transport stuck in a socket never holds a
    request thread; every caller meanwhile joins the same future.
    """
    now = time.monotonic()
    with _probes_lock:
        probe = registry.get(key)
        if probe is not None and (probe.finished_at is None or now - probe.finished_at < cache_seconds):
            return probe.future
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        probe = _Probe(future=future)
        registry[key] = probe

    def run() -> None:
        try:
            result = work()
        except Exception:  # work reports its own failures; never leave the future unanswered
            result = None
        finally:
            with _probes_lock:
                probe.finished_at = time.monotonic()
        future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def broker_queue_lengths_cached(settings: Settings, timeout: float) -> dict[str, int] | None:
    """:func:`broker_queue_lengths` for request handlers: single-flight, cached for
    :data:`QUEUE_LENGTHS_CACHE_SECONDS`, and never waits past about ``timeout`` (then None: a hung
    broker costs a page at most that, and the next view joins the same probe)."""
    future = _single_flight(
        _length_probes,
        settings.broker_url,
        lambda: broker_queue_lengths(settings, timeout),
        QUEUE_LENGTHS_CACHE_SECONDS,
        "tessera-queue-lengths",
    )
    try:
        return future.result(timeout=timeout * 1.5 + 0.5)
    except concurrent.futures.TimeoutError:
        logger.warning("broker queue lengths did not come within %.1f s", timeout)
        return None
