"""The Celery application shared by the web process (to enqueue by name) and the workers.

Importing this module must stay cheap and torch-free: the web process imports it to send
tasks, and prefork workers must not initialise CUDA before they fork. Tasks import the
engine inside their bodies.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from backend.config import Settings, get_settings
from backend.queue import (
    ACCOUNTS_PRUNE,
    DATASETS_PRUNE_UPLOADS,
    DEFAULT_QUEUE,
    LIGHT_QUEUE,
    TASK_ROUTES,
    TRAINING_QUEUE,
    TRAINING_REAP,
    TRAINING_REDISPATCH,
)

#: How long Redis keeps an unacknowledged message before handing it to another worker.
#: Training runs for hours and messages are acknowledged only when a task ends, so this must
#: exceed the longest run; a redelivered message is harmless anyway, because a worker claims
#: the database row with a conditional UPDATE before it starts.
REDIS_VISIBILITY_TIMEOUT_SECONDS = 48 * 3600


#: The modules that register tasks, one per domain (each task's name comes from ``backend.queue``).
TASK_MODULES = [
    "worker.tasks.system",
    "worker.tasks.accounts",
    "worker.tasks.datasets",
    "worker.tasks.backbones",
    "worker.tasks.training",
    "worker.tasks.predictions",
    # Not tasks: the Celery signal handlers that keep each job-running process's row on the
    # workers page. Imported with the task modules, by workers only (the web process never needs it).
    "worker.presence",
]


def broker_transport_options(broker_url: str) -> dict[str, object]:
    """Transport options for the given broker URL.

    kombu's SQLAlchemy transport passes its options straight to ``create_engine`` and has no
    visibility timeout (a fetched message is hidden, never redelivered), so it gets none.
    """
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://")):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_SECONDS}
    return {}


def create_celery(settings: Settings) -> Celery:
    """Build the Celery application for the given settings (workers and the web process)."""
    app = Celery("tessera", include=TASK_MODULES)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings.broker_url),
        broker_connection_retry_on_startup=True,
        # JSON only: a pickle payload from anyone who can write to the broker would run code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # The database row holds the outcome; Celery results would be a second, stale copy.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # Acknowledge after the task ends and hand the message back if the worker process
        # dies, so a crashed training is retried instead of silently dropped.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a GPU worker must not hoard queued trainings.
        worker_prefetch_multiplier=1,
        # Keep a running training alive across a broker hiccup; the row's lease, not the
        # message, decides who owns the task.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue=DEFAULT_QUEUE,
        # A worker started without -Q consumes every queue; `-Q tessera.light` makes a light worker
        # and `-Q tessera.training` a training-only one.
        task_queues=(Queue(DEFAULT_QUEUE), Queue(LIGHT_QUEUE), Queue(TRAINING_QUEUE)),
        task_routes=TASK_ROUTES,
        timezone="UTC",
        enable_utc=True,
        # Periodic tasks, sent by Celery beat (which `tessera serve` starts because this is not empty).
        beat_schedule=beat_schedule(settings),
    )
    return app


def beat_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    """The periodic tasks: each runs by its name from ``backend.queue`` every so many seconds."""
    return {
        ACCOUNTS_PRUNE: {
            "task": ACCOUNTS_PRUNE,
            "schedule": float(settings.account_prune_interval_seconds),
            # A run that could not start within one interval is dropped: the next one does its work.
            "options": {"expires": float(settings.account_prune_interval_seconds)},
        },
        # Uploads abandoned (or cut off by a crash) are removed once stale; checked hourly at most.
        DATASETS_PRUNE_UPLOADS: {
            "task": DATASETS_PRUNE_UPLOADS,
            "schedule": min(3600.0, settings.stale_upload_hours * 3600 / 4),
            "options": {"expires": min(3600.0, settings.stale_upload_hours * 3600 / 4)},
        },
        # Training: a lost worker's task is requeued (or failed after max attempts), and a task
        # whose message was lost is sent again. Both are cheap queries.
        # Their messages expire after a few intervals (at least a minute), not one: a short interval
        # is shorter than a polling broker's delivery delay and every run would arrive expired.
        TRAINING_REAP: {
            "task": TRAINING_REAP,
            "schedule": float(settings.task_reaper_interval_seconds),
            "options": {"expires": max(60.0, 4 * settings.task_reaper_interval_seconds)},
        },
        TRAINING_REDISPATCH: {
            "task": TRAINING_REDISPATCH,
            "schedule": float(settings.task_reaper_interval_seconds),
            "options": {"expires": max(60.0, 4 * settings.task_reaper_interval_seconds)},
        },
    }


celery_app = create_celery(get_settings())
