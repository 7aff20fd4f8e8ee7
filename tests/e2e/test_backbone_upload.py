"""The upload form in a real browser: progress, then the backbone's page updates itself to ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import torchvision.models as tvm
from playwright.sync_api import expect, sync_playwright

from backend.accounts import users
from backend.config import Settings, get_settings
from backend.db import dispose_engines, session_scope, upgrade_database
from tests.e2e.test_serve import CHROMIUM, CHROMIUM_ARGS, REPO_ROOT, free_port
from worker.tasks import backbones as jobs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]
PASSWORD = "correct-horse-battery"
SCREENSHOT = REPO_ROOT / "docs" / "img" / "backbone.png"


@pytest.fixture
def web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Settings]]:
    """The web process alone (uvicorn) on a migrated SQLite database with one member."""
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", database_url="", broker_url="")
    upgrade_database(settings)
    with session_scope(settings) as session:
        users.create_user(session, settings, "erin", PASSWORD)
    env = {
        **os.environ,
        "TESSERA_DATA_DIR": str(settings.data_dir),
        "TESSERA_DATABASE_URL": settings.database_url,
        "TESSERA_BROKER_URL": settings.broker_url,
    }
    for key in ("TESSERA_DATA_DIR", "TESSERA_DATABASE_URL", "TESSERA_BROKER_URL"):
        monkeypatch.setenv(key, env[key])
    get_settings.cache_clear()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "backend.main:create_app", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/login", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the web process did not start"
            time.sleep(0.2)
        yield url, settings
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        get_settings.cache_clear()
        dispose_engines()


def test_upload_form_shows_progress_and_the_page_follows_validation(
    web: tuple[str, Settings], tmp_path: Path
) -> None:
    url, _settings = web
    weights = tmp_path / "resnet18.pt"
    torch.save({f"module.{k}": v for k, v in tvm.resnet18(weights=None).state_dict().items()}, weights)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/login")
            page.fill("input[name=username]", "erin")
            page.fill("input[name=password]", PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)
            page.goto(f"{url}/backbones")
            expect(page.get_by_role("link", name="resnet18", exact=True)).to_be_visible()
            page.fill("#backbone-name", "my resnet")
            page.select_option("#backbone-architecture", "resnet18")
            page.set_input_files("#backbone-file", str(weights))
            page.get_by_role("button", name="Upload").click()

            # The form posts with XHR and goes to the new backbone's page, which polls its status.
            expect(page.locator("h1")).to_have_text("my resnet", timeout=30_000)
            expect(page.locator("#backbone-status")).to_contain_text("validating")
            backbone_id = int(page.url.rsplit("/", 1)[-1])
            jobs.validate(backbone_id)  # what the worker does
            expect(page.locator("#backbone-status")).to_contain_text("ready", timeout=15_000)
            expect(page.locator("#backbone-status")).to_contain_text("Stripped the key prefix module.")
            if os.environ.get("TESSERA_SCREENSHOTS"):
                page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
