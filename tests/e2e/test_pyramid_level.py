"""The new-task form's pyramid level in a real browser against `tessera serve`: an uploaded dataset
of pyramidal TIFFs offers its levels with size and µm/px, the chosen level's effect follows the
level and the image size, and a dataset without pyramids shows no level select (HTMX swaps)."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.e2e.test_serve import (  # noqa: F401  (the fixture is used by name)
    CHROMIUM,
    CHROMIUM_ARGS,
    START_TIMEOUT_SECONDS,
    Served,
    pytestmark,
    served,
    wait_healthy,
)
from tests.training.helpers import pyramid_zip

#: Worker start-up, the demo dataset and one tiny upload, on a busy 2-core machine.
VALIDATION_TIMEOUT_MS = 120_000


def test_the_level_select_follows_the_dataset_level_and_size(served: Served, tmp_path: Path) -> None:  # noqa: F811
    password = served.wait_for_line(r"Admin password: (\S+)", START_TIMEOUT_SECONDS).group(1)
    served.wait_for_line(r"registered the demo dataset", START_TIMEOUT_SECONDS)
    wait_healthy(served.url, served, START_TIMEOUT_SECONDS)
    archive = tmp_path / "slides.zip"
    archive.write_bytes(pyramid_zip())

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{served.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)

            page.goto(f"{served.url}/datasets/new")
            page.fill("#upload-name", "slides")
            page.set_input_files("#upload-file", str(archive))
            page.click("#upload-start")
            page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=30_000)
            expect(page.locator("#dataset-status [data-status]")).to_have_attribute(
                "data-status", "ready", timeout=VALIDATION_TIMEOUT_MS
            )
            page.goto(f"{served.url}/datasets")
            demo = page.locator("#datasets tr", has_text="UltraMNIST demo")
            demo.locator("a").click()
            expect(page.locator("#dataset-status [data-status]")).to_have_attribute(
                "data-status", "ready", timeout=VALIDATION_TIMEOUT_MS
            )

            page.goto(f"{served.url}/tasks/new")
            slides = page.locator("#dataset_id option", has_text="slides").get_attribute("value")

            def swapped(action) -> None:  # noqa: ANN001
                """Do `action` and wait for the level control it asks for (one swap at a time)."""
                with page.expect_response(lambda r: "/tasks/new/levels" in r.url):
                    action()

            swapped(lambda: page.select_option("#dataset_id", value=slides))
            levels = page.locator("#pyramid_level option")
            expect(levels).to_have_count(3, timeout=15_000)
            expect(levels.nth(2)).to_have_text("Level 2 · 64×64 px · 2.00 µm/px")
            effect = page.locator("#level-effect")
            # At the default 512 px, level 0 (256², 0.5 µm/px) is enlarged.
            expect(effect).to_contain_text("Level 0: 256×256 px at 0.50 µm/px → resized to 512×512 px")
            swapped(lambda: page.select_option("#pyramid_level", value="1"))
            expect(effect).to_contain_text("Level 1: 128×128 px at 1.00 µm/px", timeout=15_000)
            page.fill("#image_size", "64")
            swapped(lambda: page.locator("#image_size").blur())
            expect(effect).to_contain_text(
                "resized to 64×64 px: 2.00 µm/px per training pixel", timeout=15_000
            )
            expect(page.locator("#pyramid_level")).to_have_value("1")

            demo_id = page.locator("#dataset_id option", has_text="UltraMNIST demo").get_attribute("value")
            swapped(lambda: page.select_option("#dataset_id", value=demo_id))
            expect(page.locator("#pyramid_level")).to_have_count(0, timeout=15_000)
            expect(page.locator("#pyramid-level-single")).to_contain_text("one level")
        finally:
            browser.close()
