"""A real Celery worker process, a real broker, a task sent by name the way the API sends it."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.config import Settings
from backend.queue import SYSTEM_PING, enqueue
from tests.processes import celery_worker_command, running
from worker.tasks.system import ping_report_path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bound on worker start-up plus one ping (the worker polls an SQL broker once a second).
PING_TIMEOUT_SECONDS = 60.0


@pytest.fixture(params=["sqlite-broker", "redis-broker"])
def worker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for one broker: kombu's SQLite transport, or Redis (with Postgres if configured)."""
    if request.param == "sqlite-broker":
        return Settings(data_dir=tmp_path, database_url="", broker_url="")
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("TEST_REDIS_URL is not set (CI sets it; e.g. redis://127.0.0.1:6379/0)")
    # The production pairing: Redis broker, Postgres database when one is available.
    database_url = os.environ.get("TEST_DATABASE_URL", "")
    return Settings(data_dir=tmp_path, database_url=database_url, broker_url=redis_url)


@pytest.fixture
def running_worker(worker_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `celery worker -P solo` for these settings; stop (or kill) it and its group afterwards."""
    with running(
        celery_worker_command("--pool", "solo"), worker_settings, tmp_path / "worker.log"
    ) as process:
        yield process


@pytest.mark.slow
def test_worker_runs_ping_sent_by_name(
    worker_settings: Settings, running_worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    report_path = ping_report_path(worker_settings.data_dir, token)

    enqueue(worker_settings, SYSTEM_PING, token)

    deadline = time.monotonic() + PING_TIMEOUT_SECONDS
    while not report_path.exists():
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert running_worker.poll() is None, f"worker exited early:\n{log}"
        assert time.monotonic() < deadline, f"no ping report in {PING_TIMEOUT_SECONDS} s; worker log:\n{log}"
        time.sleep(0.2)

    report = json.loads(report_path.read_text())
    assert report["token"] == token
    assert report["select_one"] == 1
    # The solo pool runs tasks in the worker's main process: the report comes from that process.
    assert report["pid"] == running_worker.pid
    expected_dialect = "sqlite" if worker_settings.is_sqlite else worker_settings.database_url.split(":")[0]
    assert report["database"] == expected_dialect.split("+")[0]


@pytest.mark.parametrize("token", ["", "../escape", "a/b", "x" * 65, "dot.json"])
def test_ping_rejects_tokens_that_are_not_plain_names(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValueError, match="Invalid ping token"):
        ping_report_path(tmp_path, token)
