"""`tessera serve` end to end: start it, log in with a real Chromium, stop it with Ctrl-C.

The run is the one a newcomer does with `make run`: a fresh data folder, migrations, a generated
admin password read from the banner, the web server, a worker and beat as children. It ends with SIGINT
and checks that nothing started by `serve` is left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from backend.config import Settings
from backend.queue import SYSTEM_PING, enqueue
from worker.tasks.system import ping_report_path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 45.0
SCREENSHOT = REPO_ROOT / "docs" / "img" / "dashboard.png"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]


@dataclass
class Served:
    """A running `tessera serve` and everything it printed so far."""

    process: subprocess.Popen[str]
    url: str
    settings: Settings
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            assert self.process.poll() is None, f"serve exited early:\n{self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    """The installed console script when there is one (as `make run` uses), else the module."""
    script = Path(sys.executable).with_name("tessera")
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "backend.cli", "serve"]


def session_members(session_id: int) -> list[int]:
    """Live processes of a session (the session `serve` was started in), zombies excluded."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command name: state, ppid, pgrp, session, ...
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as running:
        yield running


@contextlib.contextmanager
def serving(tmp_path: Path) -> Iterator[Served]:
    """`tessera serve` on a free port with its data folder in ``tmp_path``; killed with everything
    it started at the end."""
    port = free_port()
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, database_url="", broker_url="", host="127.0.0.1", port=port)
    env = dict(os.environ)
    env.update(
        TESSERA_DATA_DIR=str(data_dir),
        TESSERA_DATABASE_URL=settings.database_url,
        TESSERA_BROKER_URL=settings.broker_url,
        TESSERA_HOST="127.0.0.1",
        TESSERA_PORT=str(port),
        TESSERA_ADMIN_USERNAME="admin",
        TESSERA_ADMIN_PASSWORD="",
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        serve_command(),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own session: every process `serve` starts can be found (and cleaned up) by session id.
        start_new_session=True,
    )
    served = Served(process=process, url=f"http://127.0.0.1:{port}", settings=settings)

    def read_output() -> None:
        # Drained continuously: a full pipe would block the web server and the worker.
        for line in process.stdout:
            served.lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in session_members(process.pid):
            os.kill(pid, signal.SIGKILL)
        reader.join(timeout=5)


def wait_healthy(url: str, served: Served, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert served.process.poll() is None, f"serve exited early:\n{served.output()}"
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"/healthz not ready within {timeout} s:\n{served.output()}")


def test_serve_login_dashboard_and_clean_ctrl_c(served: Served) -> None:
    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    assert served.url in served.output()
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)

    # The worker `serve` started picks up a task sent by name and reaches the database.
    token = uuid.uuid4().hex
    enqueue(served.settings, SYSTEM_PING, token)
    report = ping_report_path(served.settings.data_dir, token)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)
            if os.environ.get("TESSERA_SCREENSHOTS"):
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    deadline = time.monotonic() + 60
    while not report.exists():
        assert time.monotonic() < deadline, f"the worker never ran system.ping:\n{served.output()}"
        time.sleep(0.2)

    # A periodic task is scheduled (accounts.prune), so serve runs Celery beat too.
    served.wait_for_line(r"beat: Starting", START_TIMEOUT_SECONDS)
    children = [pid for pid in session_members(served.process.pid) if pid != served.process.pid]
    assert len(children) >= 3, "serve should run a web server, a worker and beat as children"

    served.process.send_signal(signal.SIGINT)
    code = served.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    assert code == 0, served.output()
    deadline = time.monotonic() + 5
    while session_members(served.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(served.process.pid) == [], "processes started by serve outlived it"
