"""``accounts.prune`` end to end: Celery beat sends it on schedule and a real worker prunes the database.

The processes are started with the very command lines `tessera serve` uses, on the test database
(SQLite, or Postgres when configured) and a broker of their own (so they never meet the tasks of
another test run on a shared Redis).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backend.config import Settings
from backend.db import session_scope
from backend.models import LoginAttempt, utcnow
from backend.queue import ACCOUNTS_PRUNE
from backend.supervisor import beat_command, child_environment, worker_command
from worker.celery_app import beat_schedule

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bound on worker and beat start-up plus one scheduled run (the SQL broker is polled every second).
PRUNE_TIMEOUT_SECONDS = 90.0


@contextmanager
def _process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            # Also reaches the prefork pool's children.
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_prune_is_scheduled_every_interval(settings: Settings) -> None:
    schedule = beat_schedule(settings)
    assert schedule[ACCOUNTS_PRUNE]["task"] == ACCOUNTS_PRUNE
    assert schedule[ACCOUNTS_PRUNE]["schedule"] == settings.account_prune_interval_seconds


@pytest.mark.slow
def test_beat_and_a_real_worker_prune_old_login_attempts(settings: Settings, tmp_path: Path) -> None:
    now = utcnow()
    with session_scope(settings) as session:
        session.add(LoginAttempt(username="old", success=False, at=now - timedelta(days=400), ip=""))
        session.add(LoginAttempt(username="recent", success=False, at=now, ip=""))

    own = settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path / 'prune-broker.db'}"})
    own.ensure_data_dir()  # beat keeps its schedule there (`serve` creates it the same way)
    env = child_environment(own)
    env["TESSERA_ACCOUNT_PRUNE_INTERVAL_SECONDS"] = "1"
    with (
        _process(worker_command(own), env, tmp_path / "worker.log") as worker,
        _process(beat_command(own), env, tmp_path / "beat.log") as beat,
    ):
        deadline = time.monotonic() + PRUNE_TIMEOUT_SECONDS
        while True:
            with session_scope(settings) as session:
                left = set(session.scalars(select(LoginAttempt.username)))
            if left == {"recent"}:
                break
            logs = "\n".join(
                f"--- {name}\n" + (tmp_path / name).read_text(errors="replace")
                for name in ("worker.log", "beat.log")
            )
            assert worker.poll() is None and beat.poll() is None, f"a process exited early:\n{logs}"
            assert time.monotonic() < deadline, f"not pruned in {PRUNE_TIMEOUT_SECONDS} s:\n{logs}"
            time.sleep(0.5)
    assert ACCOUNTS_PRUNE in (tmp_path / "worker.log").read_text(errors="replace")
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(LoginAttempt)) == 1
