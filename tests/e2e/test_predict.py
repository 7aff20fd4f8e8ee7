"""The predict form in a real browser: the upload (XHR, CSRF header), the panel that polls while
the prediction waits, then the probability bars and the evidence heatmap over the thumbnail.

The task's model is a real PatchGD model (untrained weights) exported the way a finished run
exports it; the prediction job is run in the test process, as the worker runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from backend.config import Settings
from backend.db import session_scope
from backend.models import (
    Backbone,
    BackboneStatus,
    Dataset,
    DatasetStatus,
    Prediction,
    Task,
    TaskStatus,
    User,
)
from backend.training import service
from tests.datasets_worker.builders import image_bytes
from tests.e2e.test_backbone_upload import PASSWORD, web  # noqa: F401  (the fixture)
from tests.e2e.test_serve import CHROMIUM, CHROMIUM_ARGS, REPO_ROOT
from tests.training.test_predictions_api import FINAL_METRICS
from worker.patchgd.config import config_from_dict
from worker.patchgd.export import export_safetensors
from worker.patchgd.models import build_patchgd_model
from worker.tasks.predictions import run_prediction

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]
SCREENSHOT = REPO_ROOT / "docs" / "img" / "prediction.png"


def succeeded_patchgd_task(settings: Settings) -> int:
    """A succeeded PatchGD task of erin's with its model exported like a finished run's."""
    config = {"image_size": 64, "patch_size": 16, "num_classes": 2, "backbone": "resnet18", "latent_dim": 16}
    cfg = config_from_dict("patchgd", config)
    with session_scope(settings) as session:
        owner = session.query(User).filter_by(username="erin").one()
        dataset = Dataset(
            owner_id=owner.id,
            name="pets",
            status=DatasetStatus.READY,
            num_classes=2,
            summary={"classes": ["cat", "dog"]},
        )
        backbone = Backbone(
            owner_id=None,
            name="resnet18",
            architecture="resnet18",
            builtin_key="resnet18",
            source="builtin",
            status=BackboneStatus.READY,
            details={},
            problems=[],
        )
        session.add_all([dataset, backbone])
        session.flush()
        task = Task(
            owner_id=owner.id,
            name="tiny patchgd",
            dataset_id=dataset.id,
            backbone_id=backbone.id,
            algorithm="patchgd",
            hyperparameters=cfg.to_dict(),
            status=TaskStatus.SUCCEEDED,
            final_metrics=FINAL_METRICS,
            artifacts={},
            plan={},
        )
        session.add(task)
        session.flush()
        task_id = task.id
    export_safetensors(
        build_patchgd_model(cfg, load_pretrained=False), cfg, service.task_dir(settings, task_id) / "exports"
    )
    return task_id


def test_predict_form_uploads_and_shows_the_heatmap(web, tmp_path: Path) -> None:  # noqa: F811
    url, settings = web
    task_id = succeeded_patchgd_task(settings)
    image = tmp_path / "tissue.png"
    image.write_bytes(image_bytes("PNG", (160, 120), seed=5))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/login")
            page.fill("input[name=username]", "erin")
            page.fill("input[name=password]", PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("h1")).to_have_text("Dashboard", timeout=15_000)
            page.goto(f"{url}/tasks/{task_id}")
            expect(page.locator("#predictions-empty")).to_be_visible(timeout=15_000)
            expect(page.locator("#evaluations-panel")).to_contain_text("pets")
            page.set_input_files("#predict-form input[type=file]", str(image))
            page.get_by_role("button", name="Predict").click()
            expect(page.locator("#predict-status")).to_contain_text("a worker is predicting", timeout=30_000)
            expect(page.locator(".prediction")).to_contain_text("Waiting for a worker", timeout=15_000)
            with session_scope(settings) as session:
                prediction_id = session.query(Prediction.id).filter_by(task_id=task_id).scalar()
            assert run_prediction(settings, prediction_id) == "succeeded"  # what the worker does
            # The panel polls itself and shows the result.
            expect(page.locator(".prediction .predicted")).to_be_visible(timeout=15_000)
            expect(page.locator('.prediction rect.bar[data-class="cat"]')).to_have_count(1)
            heatmap = page.locator(".prediction img.heatmap-image")
            expect(heatmap).to_have_attribute(
                "src", f"/api/v1/tasks/{task_id}/predictions/{prediction_id}/heatmap.png"
            )
            page.wait_for_function("document.querySelector('.prediction img.heatmap-image').naturalWidth > 0")
            assert (
                page.evaluate("document.querySelector('.prediction img.heatmap-image').naturalWidth") == 160
            )
            if os.environ.get("TESSERA_SCREENSHOTS"):
                page.locator("#predictions").screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
