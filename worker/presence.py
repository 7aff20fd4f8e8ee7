"""Each job-running worker process keeps its own row in the ``workers`` table.

Which process runs jobs depends on the pool: with prefork (what `tessera serve` and the compose
worker run) each pool child does, so the row is made in the child (``worker_process_init``);
with the solo or threads pool the main process does (``worker_ready``). The row names the Celery
node, host, pid, the queues the worker consumes, the device (GPU name and memory, or CPU cores
and RAM) and the job it runs now; a daemon thread updates ``last_seen`` every
``worker_heartbeat_seconds`` (at once when a job starts or ends) and, now and then, prunes the rows
of processes that died without saying so. A clean stop deletes the row.

Listed in ``worker.celery_app.TASK_MODULES``, so a worker imports it at start-up (before its
signals fire) and the web process never does; torch is imported to describe the device only
inside a job-running process, after any fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import signals

from backend.config import get_settings

logger = logging.getLogger(__name__)

#: Jobs whose first argument is a training task id (shown on the workers page to its owner).
TASK_ID_JOBS = frozenset({"training.train", "training.export"})
#: Every this many beats a process also prunes long-silent rows of others.
PRUNE_EVERY_BEATS = 30


class _State:
    """What the worker's main process learned at start-up (inherited by forked pool children)."""

    node: str = ""
    app: Any = None
    main_runs_jobs: bool = False

    def queues(self) -> list[str]:
        """The queues this worker consumes (selected by ``-Q`` once the worker is set up)."""
        if self.app is None:
            return []
        return sorted(self.app.amqp.queues.consume_from or self.app.amqp.queues)


_state = _State()
_presence: Presence | None = None


def describe_device() -> dict[str, Any]:
    """The device this process trains on: the GPU (name, memory, count) or the CPU (cores, RAM)."""
    import psutil

    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {
                "kind": "cuda",
                "name": props.name,
                "memory_bytes": int(props.total_memory),
                "count": torch.cuda.device_count(),
            }
    except Exception:  # no torch, or a driver problem: the CPU is what this process has
        logger.warning("could not query CUDA; describing the CPU", exc_info=True)
    return {"kind": "cpu", "cores": os.cpu_count() or 1, "memory_bytes": int(psutil.virtual_memory().total)}


class Presence:
    """This process's row: registered at start, beaten by a daemon thread, deleted at a clean stop."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.row_id: int | None = None
        self.job = ""
        self.task_id: int | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _register(self) -> None:
        from backend.workers import service

        self.row_id = service.register(
            self.settings,
            node=_state.node,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=_state.queues(),
            device=describe_device(),
        )

    def _beat_once(self, count: int) -> None:
        from backend.workers import service

        with self._lock:
            job, task_id = self.job, self.task_id
        if self.row_id is None:
            self._register()
        if not service.beat(self.settings, self.row_id, job=job, task_id=task_id):
            self._register()
            service.beat(self.settings, self.row_id, job=job, task_id=task_id)
        if count % PRUNE_EVERY_BEATS == 0:
            service.prune(self.settings)

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            try:
                self._beat_once(count)
            except Exception:  # a database hiccup: the next beat tries again
                logger.warning("worker heartbeat failed", exc_info=True)
            count += 1
            self._wake.wait(self.settings.worker_heartbeat_seconds)
            self._wake.clear()

    def running(self, job: str, task_id: int | None) -> None:
        """Say at once that this process now runs ``job`` (``""``: idle)."""
        with self._lock:
            self.job, self.task_id = job, task_id
        self._wake.set()

    def stop(self) -> None:
        """Stop beating and delete the row."""
        from backend.workers import service

        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self.row_id is not None:
            try:
                service.unregister(self.settings, self.row_id)
            except Exception:  # the row goes offline and is pruned later
                logger.warning("could not remove this worker's row", exc_info=True)
            self.row_id = None


def _start() -> None:
    global _presence
    if _presence is None:
        _presence = Presence(get_settings())
        _presence.start()


def _stop() -> None:
    global _presence
    if _presence is not None:
        _presence.stop()
        _presence = None


@signals.celeryd_after_setup.connect
def _on_setup(sender: str, instance: Any, **_: Any) -> None:
    """Main process: remember the node name, the app and whether the pool runs jobs here."""
    _state.node = str(sender)
    _state.app = instance.app
    pool = getattr(instance, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    _state.main_runs_jobs = "prefork" not in str(name)


@signals.worker_process_init.connect
def _on_pool_child(**_: Any) -> None:
    """A prefork pool child: it runs the jobs, so it keeps the row."""
    _start()


@signals.worker_process_shutdown.connect
def _on_pool_child_stop(**_: Any) -> None:
    _stop()


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    """The solo or threads pool runs jobs in the main process: it keeps the row itself."""
    if _state.main_runs_jobs:
        _start()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _state.main_runs_jobs:
        _stop()


def _task_id_of(job: str, args: Any) -> int | None:
    if job in TASK_ID_JOBS and args:
        try:
            return int(args[0])
        except (TypeError, ValueError):
            return None
    return None


@signals.task_prerun.connect
def _on_job_start(sender: Any = None, args: Any = None, **_: Any) -> None:
    if _presence is not None:
        job = getattr(sender, "name", "") or ""
        _presence.running(job, _task_id_of(job, args))


@signals.task_postrun.connect
def _on_job_end(**_: Any) -> None:
    if _presence is not None:
        _presence.running("", None)
