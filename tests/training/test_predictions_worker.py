"""Using trained models on a real worker and broker: predictions on an uploaded PNG and on a
pyramidal TIFF (streamed) with the evidence heatmap, a baseline prediction, refused images, an
evaluation on a second dataset, and the ONNX download exported by the worker and loaded.

Tiny runs on CPU (resnet18 at 64 px, 2 x 2 patches). The broker is Redis when ``TEST_REDIS_URL``
is set, else a SQLite file of the test's own.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.training import predictions, service
from tests.conftest import production_database
from tests.datasets_worker.builders import image_bytes, png_claiming
from tests.training.helpers import TINY_BASELINE, TINY_PATCHGD, builtin_backbone, ready_dataset
from tests.training.test_worker import SHORT, Processes, wait_until
from worker.patchgd.testing import write_pyramidal_tiff

#: Bound on any one wait: generous, as the machine running the suite may be busy with others.
TIMEOUT_SECONDS = 600.0


@pytest.fixture
def worker_settings(settings, tmp_path: Path):  # noqa: ANN001, ANN201
    broker = os.environ.get("TEST_REDIS_URL") or f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return settings.model_copy(update={"broker_url": broker, **SHORT})


@pytest.fixture
def processes(worker_settings, tmp_path: Path):  # noqa: ANN001, ANN201
    started = Processes(worker_settings, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def finished(client, auth: dict, path: str, processes: Processes) -> dict:  # noqa: ANN001
    """Poll ``path`` until its job has ended; returns its body."""
    body: dict = {}

    def done() -> bool:
        nonlocal body
        response = client.get(path, headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["status"] in ("succeeded", "failed")

    wait_until(processes, path, done, timeout=TIMEOUT_SECONDS)
    return body


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
@production_database
def test_trained_models_predict_explain_evaluate_and_export(
    worker_settings, processes, make_client, make_user, bearer, tmp_path
):
    """On the production database only: on SQLite, tests/e2e/test_workflow.py predicts with a
    model trained by ``tessera serve``'s real worker, tests/e2e/test_predict.py runs the prediction
    job, and the prediction and evaluation endpoints are tested on both databases in
    tests/training/test_predictions_api.py."""
    client = make_client(worker_settings)
    auth = bearer(client, make_user())
    dataset_id = ready_dataset(worker_settings, client, auth, size=64)
    # Both datasets validated here before the worker starts (it then finds them ready and skips).
    second = ready_dataset(worker_settings, client, auth, name="more pets", size=64, per_class=6)
    backbone_id = builtin_backbone(worker_settings)
    processes.start("worker")
    tasks = {}
    for algorithm, hp in (("patchgd", TINY_PATCHGD), ("baseline", TINY_BASELINE)):
        response = client.post(
            "/api/v1/tasks",
            json={
                "name": algorithm,
                "dataset_id": dataset_id,
                "backbone_id": backbone_id,
                "algorithm": algorithm,
                "hyperparameters": hp,
            },
            headers=auth,
        )
        assert response.status_code == 201, response.text
        tasks[algorithm] = response.json()["id"]
    for algorithm, task_id in tasks.items():
        wait_until(
            processes,
            f"the {algorithm} run",
            lambda t=task_id: (
                client.get(f"/api/v1/tasks/{t}", headers=auth).json()["status"] in service.TERMINAL_NAMES
            ),
            timeout=TIMEOUT_SECONDS,
        )
        assert client.get(f"/api/v1/tasks/{task_id}", headers=auth).json()["status"] == "succeeded"

    def predict(task_id: int, data: bytes, name: str) -> dict:
        response = client.post(
            f"/api/v1/tasks/{task_id}/predictions",
            files={"file": (name, data, "application/octet-stream")},
            headers=auth,
        )
        assert response.status_code == 202, response.text
        return finished(
            client, auth, f"/api/v1/tasks/{task_id}/predictions/{response.json()['id']}", processes
        )

    patchgd = tasks["patchgd"]
    # An ordinary image of another size and shape: resized to 64 px like the training images.
    png = image_bytes("PNG", (90, 60), seed=7)
    body = predict(patchgd, png, "photo.png")
    assert body["status"] == "succeeded", (body, processes.logs())
    result = body["result"]
    assert result["classes"] == ["cat", "dog"] and set(result["probabilities"]) == {"cat", "dog"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["predicted"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["input"]["streamed"] is False and (result["input"]["width"], result["input"]["height"]) == (
        90,
        60,
    )
    evidence = result["evidence"]
    assert (
        evidence["grid"] == 2 and len(evidence["cells"]) == 2 and all(len(r) == 2 for r in evidence["cells"])
    )
    assert evidence["target"] == result["predicted"] and evidence["baseline"] == "mean"
    # The same probabilities as the exported model gives on the image resized the training way.
    import torch

    from worker.patchgd import load_model
    from worker.patchgd.data import load_resized
    from worker.patchgd.grid import normalize_uint8

    exports = service.task_dir(worker_settings, patchgd) / "exports"
    model, cfg = load_model(exports)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png)
    with torch.no_grad():
        expected = torch.softmax(model(normalize_uint8(load_resized(photo, 64)).unsqueeze(0)), dim=1)[0]
    assert [result["probabilities"][c] for c in ("cat", "dog")] == pytest.approx(expected.tolist(), abs=1e-4)
    heatmap = client.get(body["heatmap_url"], headers=auth)
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
    width, height = png_size(heatmap.content)
    assert width % 2 == 0 and height % 2 == 0 and [width, height] == evidence["heatmap_size"]
    assert width > height  # drawn over the 90 x 60 image's thumbnail, aspect kept
    thumbnail = client.get(body["thumbnail_url"], headers=auth)
    assert thumbnail.status_code == 200 and png_size(thumbnail.content) == (90, 60)

    # A pyramidal TIFF: streamed from its smallest level of at least 64 px (128 px: level 2).
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", 512, tile=128)
    body = predict(patchgd, slide.read_bytes(), "slide.tiff")
    assert body["status"] == "succeeded", (body, processes.logs())
    streamed = body["result"]["input"]
    assert streamed["streamed"] is True and streamed["level"] == 2 and streamed["level_size"] == [128, 128]
    assert len(streamed["levels"]) == 3 and streamed["width"] == 512
    assert np.array(body["result"]["evidence"]["cells"]).shape == (2, 2)
    assert client.get(body["heatmap_url"], headers=auth).status_code == 200

    # Refused images end failed, with the reason.
    truncated = image_bytes("PNG", (64, 64))[:300]
    for data, name, words in (
        (truncated, "cut.png", "Corrupt or truncated image data"),
        (b"just some text, not an image\n" * 4, "notes.png", "The file is text"),
        (png_claiming(60_000, 60_000), "bomb.png", "decompression bomb"),
        (b"%PDF-1.4 a document", "paper.pdf", "a PDF document"),
    ):
        body = predict(patchgd, data, name)
        assert body["status"] == "failed" and words in body["error"], (name, body)
        assert body["heatmap_url"] is None

    # The task page's panel shows the results: bars, the heatmap, the refusal.
    panel = client.get(f"/tasks/{patchgd}/predictions/panel", headers=auth).text
    assert (
        'class="bar" data-class="cat"' in panel
        # Ids: Postgres keeps its sequences between tests, so the first prediction is not always 1.
        and re.search(rf'src="/api/v1/tasks/{patchgd}/predictions/\d+/heatmap.png"', panel)
    )
    assert "decompression bomb" in panel and "every 2s" not in panel

    # A baseline model: probabilities and the thumbnail, no heatmap.
    baseline = tasks["baseline"]
    body = predict(baseline, png, "photo.png")
    assert body["status"] == "succeeded", (body, processes.logs())
    assert body["result"]["evidence"] is None and body["heatmap_url"] is None and body["thumbnail_url"]
    base = f"/api/v1/tasks/{baseline}/predictions/{body['id']}"
    assert client.get(f"{base}/heatmap.png", headers=auth).status_code == 404
    body = predict(baseline, slide.read_bytes(), "slide.tif")
    assert body["status"] == "succeeded" and body["result"]["input"]["streamed"] is True, body
    panel = client.get(f"/tasks/{baseline}/predictions/panel", headers=auth).text
    assert "no per-patch heatmap" in panel and "heatmap.png" not in panel

    # Evaluation on a second dataset with the same classes.
    response = client.post(f"/api/v1/tasks/{patchgd}/evaluations", json={"dataset_id": second}, headers=auth)
    assert response.status_code == 202, response.text
    evaluation = finished(
        client, auth, f"/api/v1/tasks/{patchgd}/evaluations/{response.json()['id']}", processes
    )
    assert evaluation["status"] == "succeeded", (evaluation, processes.logs())
    metrics = evaluation["result"]
    assert metrics["split"] in ("test", "val", "all") and metrics["classes"] == ["cat", "dog"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_samples"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and len(metrics["per_class_recall"]) == 2

    # The ONNX download: exported by the worker on request, then a model onnx and onnxruntime load.
    import onnx
    import onnxruntime

    url = f"/api/v1/tasks/{patchgd}/model?format=onnx"
    assert client.get(url, headers=auth).status_code == 202
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while (download := client.get(url, headers=auth)).status_code == 202:
        assert time.monotonic() < deadline, processes.logs()
        time.sleep(0.5)
    assert download.status_code == 200, download.text
    onnx.checker.check_model(onnx.load_from_string(download.content))
    session = onnxruntime.InferenceSession(download.content, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        assert np.allclose(logits, model(images).numpy(), atol=1e-4)
    assert predictions.predictions_dir(worker_settings, patchgd).is_dir()
    assert client.delete(f"/api/v1/tasks/{patchgd}", headers=auth).status_code == 200
    assert not predictions.predictions_dir(worker_settings, patchgd).exists()
