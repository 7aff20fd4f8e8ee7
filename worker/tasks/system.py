"""Platform tasks: proving that a worker runs and reaches the database."""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from backend.config import get_settings
from backend.db import session_scope
from backend.queue import SYSTEM_PING
from worker.celery_app import celery_app

#: Subfolder of the data dir where ``system.ping`` leaves its reports.
PING_DIR = "pings"

_PING_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def ping_report_path(data_dir: Path, token: str) -> Path:
    """Where the report of the ping identified by ``token`` is written (and read back)."""
    if not _PING_TOKEN.fullmatch(token):
        raise ValueError(f"Invalid ping token {token!r}: use 1 to 64 letters, digits, '-' or '_'.")
    return data_dir / PING_DIR / f"{token}.json"


@celery_app.task(name=SYSTEM_PING)
def ping(token: str) -> dict[str, object]:
    """Prove that a worker runs and reaches the database.

    Runs ``SELECT 1`` through the same session factory the tasks use, then writes a JSON report
    (worker host, process id, database dialect, time) to ``<data_dir>/pings/<token>.json``. The
    data dir is shared by the web process and the workers, so whoever sent the ping can read it.
    """
    settings = get_settings()
    path = ping_report_path(settings.data_dir, token)
    with session_scope(settings) as session:
        answer = session.execute(text("SELECT 1")).scalar_one()
        dialect = session.get_bind().dialect.name
    report: dict[str, object] = {
        "token": token,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "database": dialect,
        "select_one": answer,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees half a report.
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(report), encoding="utf-8")
    os.replace(partial, path)
    return report
