"""Datasets in a real browser against `tessera serve`: the demo dataset `serve` registers becomes
ready; an archive uploaded from the upload page (tus, resumable) validates live; its page shows the
class chart and thumbnails."""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.datasets.helpers import good_zip
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

#: Worker start-up, the demo (120 canvases) and one tiny upload, on a busy 2-core machine.
VALIDATION_TIMEOUT_MS = 120_000
DEMO_SCREENSHOT = REPO_ROOT / "docs" / "img" / "dataset-demo.png"


def test_upload_validates_live_and_shows_chart_and_thumbnails(served: Served, tmp_path: Path) -> None:  # noqa: F811
    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    served.wait_for_line(r"registered the demo dataset", START_TIMEOUT_SECONDS)
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)
    archive = tmp_path / "pets.zip"
    archive.write_bytes(good_zip(("cat", "dog"), per_class=3))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)

            requests: list[str] = []
            page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
            page.goto(f"{served.url}/datasets/new")
            page.fill("#upload-name", "pets")
            page.set_input_files("#upload-file", str(archive))
            page.click("#upload-start")
            page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=30_000)
            expect(page.locator("h1")).to_have_text("pets")
            # The page used the resumable (tus) upload: a creation POST, then PATCH chunks.
            assert any(r.startswith("POST ") and r.endswith("/api/v1/datasets/uploads") for r in requests)
            assert any(r.startswith("PATCH ") and "/api/v1/datasets/uploads/" in r for r in requests)
            # The status panel polls until the worker is done, then the page reloads with results.
            expect(page.locator("#dataset-status [data-status]")).to_have_attribute(
                "data-status", "ready", timeout=VALIDATION_TIMEOUT_MS
            )
            expect(page.locator("#class-chart rect.bar")).to_have_count(2, timeout=15_000)
            thumbs = page.locator("#thumbnails img")
            expect(thumbs.first).to_be_visible()
            assert thumbs.count() >= 4
            all_loaded = (
                "Array.from(document.querySelectorAll('#thumbnails img'))"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            page.wait_for_function(all_loaded, timeout=15_000)

            # The demo dataset serve registered for the admin becomes ready too.
            page.goto(f"{served.url}/datasets")
            demo = page.locator("#datasets tr", has_text="UltraMNIST demo")
            expect(demo).to_have_count(1)
            demo.locator("a").click()
            expect(page.locator("#dataset-status [data-status]")).to_have_attribute(
                "data-status", "ready", timeout=VALIDATION_TIMEOUT_MS
            )
            expect(page.locator("#class-chart rect.bar")).not_to_have_count(0)
            if os.environ.get("TESSERA_SCREENSHOTS"):
                page.set_viewport_size({"width": 1280, "height": 2400})  # every lazy thumbnail in view
                page.wait_for_function(all_loaded, timeout=15_000)
                page.screenshot(path=str(DEMO_SCREENSHOT), full_page=True)
        finally:
            browser.close()


def test_an_upload_cut_by_a_page_reload_resumes_where_it_stopped(served: Served, tmp_path: Path) -> None:  # noqa: F811
    """The browser reloads the page after the first 16 MiB chunk; choosing the same file again
    resumes from the server's offset (tus), and the stored file is byte-identical (SHA-256)."""
    import hashlib
    import io
    import zipfile

    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("scan/large.bin", os.urandom(40 * 1024 * 1024))  # three chunks of 16 MiB
    payload = buffer.getvalue()
    upload_file = tmp_path / "large.zip"
    upload_file.write_bytes(payload)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)

            # Let the first chunk through, hold the second: the reload then cuts the upload.
            patches: list[object] = []

            def hold_second_patch(route, request) -> None:  # noqa: ANN001 (Playwright's types)
                if request.method == "PATCH":
                    patches.append(route)
                    if len(patches) > 1:
                        return  # never answered: the page is reloaded while it waits
                route.continue_()

            page.route("**/api/v1/datasets/uploads/*", hold_second_patch)
            page.goto(f"{served.url}/datasets/new")
            page.fill("#upload-name", "large")
            page.set_input_files("#upload-file", str(upload_file))
            page.click("#upload-start")
            for _ in range(600):
                if len(patches) > 1:
                    break
                page.wait_for_timeout(100)
            assert len(patches) > 1, "the second chunk was never sent"
            page.unroute("**/api/v1/datasets/uploads/*")
            page.reload()

            sent: list[tuple[str, dict[str, str]]] = []
            page.on("request", lambda request: sent.append((request.method, request.headers)))
            page.fill("#upload-name", "large")
            page.set_input_files("#upload-file", str(upload_file))
            page.click("#upload-start")
            page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
            dataset_id = int(page.url.rsplit("/", 1)[1])

            resumed = [headers for method, headers in sent if method == "PATCH"]
            assert resumed, "nothing was sent after the reload"
            # The first chunk was not sent again: the upload went on from the server's offset.
            assert int(resumed[0]["upload-offset"]) >= 16 * 1024 * 1024
            detail = page.request.get(f"{served.url}/api/v1/datasets/{dataset_id}").json()
            assert detail["size_bytes"] == len(payload)
            assert detail["sha256"] == hashlib.sha256(payload).hexdigest()
        finally:
            browser.close()
