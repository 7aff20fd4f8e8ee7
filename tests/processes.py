"""Real Tessera processes for tests: a Celery worker (or any command) in its own process group,
logging to a file, stopped with SIGTERM and then killed with its whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from backend.config import Settings
from backend.supervisor import child_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def celery_worker_command(*options: str, name: str = "test") -> list[str]:
    """``celery worker`` for the Tessera app with ``options`` (pool, queues...), a unique hostname."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", *options] + [
        "--loglevel",
        "INFO",
        "--hostname",
        f"{name}-{uuid.uuid4().hex[:8]}@%h",
    ]


@contextlib.contextmanager
def running(
    command: Sequence[str], settings: Settings, log_path: Path, *, stop_timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with the environment ``tessera serve`` gives its children for ``settings``.

    On exit: SIGTERM, a wait of ``stop_timeout`` seconds, then SIGKILL to the whole process group
    (pool processes and measuring children included), so nothing outlives the test.
    """
    log = log_path.open("wb")
    process = subprocess.Popen(
        list(command),
        cwd=REPO_ROOT,
        env=child_environment(settings),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=stop_timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
