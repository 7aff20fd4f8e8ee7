"""A task's page in a real browser against `tessera serve` while its worker trains it: the progress
bar moves, the log and the uPlot charts grow without a reload, and the patch-coverage heatmap and
memory meter are drawn; when the run ends the page reloads once to show the results."""

from __future__ import annotations

import os
import time

import httpx
from playwright.sync_api import expect, sync_playwright

from tests.e2e.test_serve import (  # noqa: F401  (the fixture is used by name)
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO_ROOT,
    START_TIMEOUT_SECONDS,
    Served,
    pytestmark,
    served,
    wait_healthy,
)
from tests.training.helpers import TINY_PATCHGD, dataset_zip

#: Worker start-up (torch), validation, and a 2-epoch CPU run on a busy 2-core machine.
RUN_TIMEOUT_S = 600.0
SCREENSHOT = REPO_ROOT / "docs" / "img" / "task-live.png"


def _wait(what: str, check, served: Served, timeout: float = RUN_TIMEOUT_S):  # noqa: ANN001, ANN202, F811
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{served.output()[-6000:]}")


def _train_a_task(served: Served, password: str) -> int:  # noqa: F811
    """Through the API: a small dataset, validated by serve's worker, and a PatchGD task on it."""
    with httpx.Client(base_url=served.url, timeout=30) as api:
        token = api.post("/api/v1/auth/token", data={"username": "admin", "password": password}).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        archive = dataset_zip(per_class=8, size=64)
        created = api.post(
            "/api/v1/datasets",
            data={"name": "live"},
            files={"file": ("live.zip", archive, "application/zip")},
            headers=auth,
        )
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        _wait(
            "the dataset",
            lambda: api.get(f"/api/v1/datasets/{dataset_id}", headers=auth).json()["status"] == "ready",
            served,
        )
        backbones = api.get("/api/v1/backbones", headers=auth).json()
        resnet = next(b for b in backbones if b["architecture"] == "resnet18" and b["builtin"])
        task = api.post(
            "/api/v1/tasks",
            json={
                "name": "live view",
                "dataset_id": dataset_id,
                "backbone_id": resnet["id"],
                "hyperparameters": dict(TINY_PATCHGD, epochs=2),
            },
            headers=auth,
        )
        assert task.status_code == 201, task.text
        return task.json()["id"]


def test_the_task_page_is_live_while_a_worker_trains(served: Served) -> None:  # noqa: F811
    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)
    task_id = _train_a_task(served, password)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)
            page.goto(f"{served.url}/tasks/{task_id}")
            # A mark on this document: a reload would remove it.
            page.evaluate("window.__sameDocument = true")

            bar = page.locator("#task-bar")
            seen: set[int] = set()

            def moving() -> bool:
                if bar.count():
                    seen.add(int(bar.get_attribute("value") or 0))
                return len({v for v in seen if v < 100}) >= 2

            _wait("the progress bar to move", moving, served)
            expect(page.locator("#event-log li[data-kind=claimed]")).to_have_count(1)
            # The first epoch lands: a row, a log line and the uPlot charts, in the same document.
            expect(page.locator("#chart-loss canvas")).to_have_count(1, timeout=RUN_TIMEOUT_S * 1000)
            assert page.evaluate("window.__sameDocument === true"), "the page reloaded to show an epoch"
            expect(page.locator("#epoch-rows tr")).not_to_have_count(0)
            expect(page.locator("#event-log li[data-kind=epoch]")).not_to_have_count(0)
            expect(page.locator("#chart-scores canvas")).to_have_count(1)
            expect(page.locator("#coverage-heatmap rect")).to_have_count(4)
            expect(page.locator("#memory-meter")).to_have_count(1)
            if os.environ.get("TESSERA_SCREENSHOTS"):
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            # The end: one reload shows the results, and the charts hold both epochs.
            expect(page.locator("#task-status [data-status]")).to_have_attribute(
                "data-status", "succeeded", timeout=RUN_TIMEOUT_S * 1000
            )
            expect(page.locator("#task-charts")).to_have_attribute("data-drawn-epochs", "2", timeout=15_000)
            expect(page.locator("#epoch-rows tr")).to_have_count(2)
            expect(page.locator("#event-log li[data-kind=finished]")).to_have_count(1)
            assert not errors, errors
        finally:
            browser.close()
