"""The whole workflow in a real browser against `tessera serve` and its real workers: sign in, take
the demo dataset serve built, plan memory for both algorithms and accept PatchGD's plan, create
the task, watch it train live (progress bar, charts drawn without a reload, log, coverage),
see it succeed, download the model, and predict on an image to see the evidence heatmap."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from safetensors.torch import load as load_safetensors

from tests.e2e.test_serve import (  # noqa: F401  (pytestmark applies to this module)
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO_ROOT,
    START_TIMEOUT_SECONDS,
    Served,
    pytestmark,
    serving,
    wait_healthy,
)

#: Worker start-up (torch), the demo's build and validation, a plan and a 2-epoch CPU run.
RUN_TIMEOUT_S = 900.0
SCREENSHOT = REPO_ROOT / "docs" / "img" / "task-live.png"


@pytest.fixture
def served(tmp_path: Path, tiny_calibration: Path) -> Iterator[Served]:
    """`tessera serve` whose data folder starts with the planner's calibration for this run's sizes
    (64 px images, 32 px patches): the plan is still made by serve's light worker, without
    measuring again what the test run already measured."""
    (tmp_path / "data").mkdir()
    shutil.copy(tiny_calibration, tmp_path / "data" / tiny_calibration.name)
    with serving(tmp_path) as running:
        yield running


def _wait(what: str, check, served: Served, timeout: float = RUN_TIMEOUT_S):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}:\n{served.output()[-6000:]}")


def _digit_canvas(path) -> None:  # noqa: ANN001
    """A 256² grayscale canvas with a bright stroke, like the demo's images."""
    image = Image.new("L", (256, 256), 0)
    for x in range(60, 140):
        for y in range(100, 108):
            image.putpixel((x, y), 255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def test_plan_create_watch_download_and_predict_in_the_browser(served: Served, tmp_path) -> None:  # noqa: ANN001
    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)
    image = tmp_path / "canvas.png"
    _digit_canvas(image)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            # 1. Sign in.
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)

            # 2. The demo dataset serve registered, once its worker has built and validated it.
            def demo_offered() -> bool:
                page.goto(f"{served.url}/tasks/new")
                # Until a dataset is ready the page shows its empty state instead of the form.
                select = page.locator("#dataset_id")
                return select.count() == 1 and "UltraMNIST demo" in (select.text_content() or "")

            _wait("the demo dataset in the new-task form", demo_offered, served)
            page.select_option("#dataset_id", label=page.locator("#dataset_id option").first.text_content())
            page.fill("#name", "workflow")
            for field, value in {
                "image_size": "64",
                "patch_size": "32",
                "batch_size": "4",
                "epochs": "2",
                "warmup_epochs": "0",
                "memory_budget_gib": "4",
            }.items():
                page.fill(f"#{field}", value)

            # 3. Plan both algorithms under the budget, and accept PatchGD's plan in one click.
            page.click("#plan-button")
            expect(page.locator("#plan-summary")).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
            expect(page.locator("#plan-patchgd")).to_have_attribute("data-fits", "yes")
            expect(page.locator("#plan-baseline")).to_have_count(1)
            page.click("#accept-patchgd")
            expect(page.locator("#accepted-patchgd")).to_be_visible(timeout=30_000)
            assert page.locator("#plan_token").get_attribute("value")
            assert page.locator("#algorithm").input_value() == "patchgd"

            # 4. Create it.
            page.get_by_role("button", name="Create and queue").click()
            expect(page.locator("h1")).to_have_text("workflow", timeout=15_000)
            task_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
            # A mark on this document: a reload would remove it.
            page.evaluate("window.__sameDocument = true")

            # 5. Watch it train: the bar moves; rows, log lines and the uPlot charts arrive live.
            bar = page.locator("#task-bar")
            seen: set[int] = set()

            def moving() -> bool:
                if bar.count():
                    seen.add(int(bar.get_attribute("value") or 0))
                return len({v for v in seen if v < 100}) >= 2

            _wait("the progress bar to move", moving, served)
            expect(page.locator("#event-log li[data-kind=claimed]")).to_have_count(1)
            expect(page.locator("#chart-loss canvas")).to_have_count(1, timeout=RUN_TIMEOUT_S * 1000)
            assert page.evaluate("window.__sameDocument === true"), "the page reloaded to show an epoch"
            expect(page.locator("#epoch-rows tr")).not_to_have_count(0)
            expect(page.locator("#chart-scores canvas")).to_have_count(1)
            expect(page.locator("#coverage-heatmap rect")).to_have_count(4)
            expect(page.locator("#memory-meter")).to_have_count(1)
            if os.environ.get("TESSERA_SCREENSHOTS"):
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)

            # 6. It succeeds; one reload shows the results and the charts hold both epochs.
            expect(page.locator("#task-status [data-status]")).to_have_attribute(
                "data-status", "succeeded", timeout=RUN_TIMEOUT_S * 1000
            )
            expect(page.locator("#task-charts")).to_have_attribute("data-drawn-epochs", "2", timeout=15_000)
            expect(page.locator("#epoch-rows tr")).to_have_count(2)
            expect(page.locator("#event-log li[data-kind=finished]")).to_have_count(1)
            expect(page.locator("#final-metrics")).to_be_visible()

            # 7. Download the model: real safetensors weights.
            with page.expect_download() as download:
                page.click("#download-safetensors")
            weights = load_safetensors(download.value.path().read_bytes())
            assert weights and all(t.numel() > 0 for t in weights.values())

            # 8. Predict on an image: the probabilities and the evidence heatmap over the thumbnail.
            page.set_input_files("#predict-form input[type=file]", str(image))
            page.get_by_role("button", name="Predict").click()
            expect(page.locator(".prediction .predicted")).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
            heatmap = page.locator(".prediction img.heatmap-image")
            expect(heatmap).to_have_count(1)
            assert f"/api/v1/tasks/{task_id}/predictions/" in (heatmap.get_attribute("src") or "")
            page.wait_for_function("document.querySelector('.prediction img.heatmap-image').naturalWidth > 0")
            assert not errors, errors
        finally:
            browser.close()
