"""Predictions and evaluations through the API, without a worker: who may, what is refused
(409 before the task succeeded, 413 over the limit, 422 for other classes, 403 without CSRF,
404 for anyone else's ids) and that nothing of a refused upload, nor a deleted task's
predictions, stays on disk. The worker's side is in test_predictions_worker.py."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from backend.db import session_scope
from backend.models import JobStatus, Prediction, Task, TaskStatus
from backend.training import predictions
from tests.datasets_worker.builders import image_bytes
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset


@pytest.fixture
def setup(settings, client, make_user, bearer):
    auth = bearer(client, make_user())
    dataset_id = ready_dataset(settings, client, auth)
    backbone_id = builtin_backbone(settings)
    body = {
        "name": "run",
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
    }
    response = client.post("/api/v1/tasks", json=body, headers=auth)
    assert response.status_code == 201, response.text
    return {"auth": auth, "task_id": response.json()["id"], "dataset_id": dataset_id}


#: The shape of a finished run's held-out evaluation (what the task page shows).
FINAL_METRICS = {
    "split": "test",
    "accuracy": 0.5,
    "qwk": 0.0,
    "num_samples": 4,
    "confusion_matrix": [[1, 1], [1, 1]],
    "per_class_recall": [0.5, 0.5],
    "classes": ["cat", "dog"],
}


def succeed(settings, task_id: int) -> None:  # noqa: ANN001
    """The row as a finished run leaves it (the model files are not needed by these routes)."""
    with session_scope(settings) as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(status=TaskStatus.SUCCEEDED, final_metrics=FINAL_METRICS)
        )


def upload(client, task_id: int, headers: dict, data: bytes = b"", name: str = "slide.png"):  # noqa: ANN001, ANN201
    return client.post(
        f"/api/v1/tasks/{task_id}/predictions",
        files={"file": (name, data or image_bytes("PNG", (40, 30)), "image/png")},
        headers=headers,
    )


def leftovers(settings, task_id: int) -> list[str]:  # noqa: ANN001
    folder = predictions.predictions_dir(settings, task_id)
    return (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if folder.exists()
        else []
    )


def count_predictions(settings) -> int:  # noqa: ANN001
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count(Prediction.id))) or 0)


def test_a_task_that_has_not_succeeded_has_no_model_to_use(settings, client, setup):
    task_id, auth = setup["task_id"], setup["auth"]
    response = upload(client, task_id, auth)
    assert response.status_code == 409 and "only a succeeded task" in response.json()["detail"]
    evaluation = client.post(
        f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": setup["dataset_id"]}, headers=auth
    )
    assert evaluation.status_code == 409
    assert leftovers(settings, task_id) == [] and count_predictions(settings) == 0


def test_an_upload_is_queued_with_its_file_in_the_prediction_folder(settings, client, setup):
    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    data = image_bytes("PNG", (50, 20), seed=3)
    response = upload(client, task_id, auth, data, name="scan one.PNG")
    assert response.status_code == 202, response.text
    body = response.json()
    assert (
        body["status"] == "queued" and body["filename"] == "scan one.PNG" and body["size_bytes"] == len(data)
    )
    assert body["heatmap_url"] is None and body["thumbnail_url"] is None
    assert leftovers(settings, task_id) == [f"{body['id']}/image.png"]
    stored = predictions.prediction_dir(settings, task_id, body["id"]) / "image.png"
    assert stored.read_bytes() == data
    listed = client.get(f"/api/v1/tasks/{task_id}/predictions", headers=auth).json()
    assert [p["id"] for p in listed] == [body["id"]]
    one = client.get(f"/api/v1/tasks/{task_id}/predictions/{body['id']}", headers=auth)
    assert one.status_code == 200 and one.json()["status"] == "queued"
    # No image yet: 404 with a reason.
    heatmap = client.get(f"/api/v1/tasks/{task_id}/predictions/{body['id']}/heatmap.png", headers=auth)
    assert heatmap.status_code == 404 and "no heatmap" in heatmap.json()["detail"]


def test_an_oversized_upload_is_413_and_leaves_nothing(settings, make_client, make_user, bearer):
    small = settings.model_copy(update={"max_prediction_upload_bytes": 10_000})
    client = make_client(small)
    auth = bearer(client, make_user())
    dataset_id = ready_dataset(small, client, auth)
    backbone_id = builtin_backbone(small)
    task_id = client.post(
        "/api/v1/tasks",
        json={
            "name": "t",
            "dataset_id": dataset_id,
            "backbone_id": backbone_id,
            "hyperparameters": TINY_PATCHGD,
        },
        headers=auth,
    ).json()["id"]
    succeed(small, task_id)
    big = image_bytes("PNG", (200, 200))  # noise: about 120 kB
    assert len(big) > 10_000
    response = upload(client, task_id, auth, big)
    assert response.status_code == 413, response.text
    assert "max_prediction_upload_bytes" in response.json()["detail"]
    # Streamed without a Content-Length: refused as the bytes pass the limit.
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def chunks():  # noqa: ANN202
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    streamed = client.post(
        f"/api/v1/tasks/{task_id}/predictions",
        content=chunks(),
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert streamed.status_code == 413, streamed.text
    assert leftovers(small, task_id) == [] and count_predictions(small) == 0
    # Not a form, and an empty file: 400, nothing kept either.
    not_form = client.post(f"/api/v1/tasks/{task_id}/predictions", content=b"x", headers=auth)
    assert not_form.status_code == 400
    empty = client.post(
        f"/api/v1/tasks/{task_id}/predictions", files={"file": ("e.png", b"", "image/png")}, headers=auth
    )
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    assert leftovers(small, task_id) == [] and count_predictions(small) == 0


def test_a_browser_upload_needs_the_csrf_header(settings, client, make_user, login, setup):
    succeed(settings, setup["task_id"])
    browser_user = make_user()
    token = login(client, browser_user)
    # The signed-in browser is another user: their own task is needed for a 202; here the point is
    # the 403 that comes before any ownership check.
    response = upload(client, setup["task_id"], {})
    assert response.status_code == 403 and "X-CSRF-Token" in response.json()["detail"]
    with_header = upload(client, setup["task_id"], {"X-CSRF-Token": token})
    assert with_header.status_code == 404  # someone else's task


def test_another_user_s_task_and_prediction_ids_are_404_everywhere(
    settings, client, make_user, bearer, setup
):
    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    prediction_id = upload(client, task_id, auth).json()["id"]
    evaluation_id = client.post(
        f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": setup["dataset_id"]}, headers=auth
    ).json()["id"]
    other = bearer(client, make_user())
    base = f"/api/v1/tasks/{task_id}"
    for path in (
        f"{base}/predictions",
        f"{base}/predictions/{prediction_id}",
        f"{base}/predictions/{prediction_id}/heatmap.png",
        f"{base}/predictions/{prediction_id}/thumbnail.png",
        f"{base}/evaluations",
        f"{base}/evaluations/{evaluation_id}",
        f"{base}/model",
        f"{base}/model?format=onnx",
    ):
        response = client.get(path, headers=other)
        assert response.status_code == 404, (path, response.text)
    assert upload(client, task_id, other).status_code == 404
    refused = client.post(f"{base}/evaluations", json={"dataset_id": setup["dataset_id"]}, headers=other)
    assert refused.status_code == 404
    # The owner's ids under another task of theirs are 404 too (a prediction belongs to one task).
    second = client.post(f"{base}/clone", headers=auth).json()["id"]
    succeed(settings, second)
    assert client.get(f"/api/v1/tasks/{second}/predictions/{prediction_id}", headers=auth).status_code == 404
    assert client.get(f"/api/v1/tasks/{second}/evaluations/{evaluation_id}", headers=auth).status_code == 404
    assert leftovers(settings, task_id) == [f"{prediction_id}/image.png"]  # the refused upload left nothing


def test_evaluation_needs_a_ready_dataset_of_yours_with_the_same_classes(settings, client, setup):
    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    birds = ready_dataset(settings, client, auth, name="birds", classes=("cat", "owl"))
    response = client.post(f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": birds}, headers=auth)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert response.json()["error"] == "classes_mismatch"
    assert "lacks dog" in detail and "has owl" in detail
    missing = client.post(f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": 999999}, headers=auth)
    assert missing.status_code == 404
    same = ready_dataset(settings, client, auth, name="more pets")
    accepted = client.post(f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": same}, headers=auth)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["status"] == "queued" and body["dataset_name"] == "more pets" and body["dataset_id"] == same
    listed = client.get(f"/api/v1/tasks/{task_id}/evaluations", headers=auth).json()
    assert [e["id"] for e in listed] == [body["id"]]


def test_deleting_a_task_removes_its_predictions_and_their_files(settings, client, setup):
    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    prediction_id = upload(client, task_id, auth).json()["id"]
    assert leftovers(settings, task_id)
    assert client.delete(f"/api/v1/tasks/{task_id}", headers=auth).status_code == 200
    assert not predictions.predictions_dir(settings, task_id).exists()
    assert count_predictions(settings) == 0
    gone = client.get(f"/api/v1/tasks/{task_id}/predictions/{prediction_id}", headers=auth)
    assert gone.status_code == 404


def test_a_worker_whose_prediction_was_deleted_writes_nothing(settings, client, setup):
    from worker.tasks.predictions import run_prediction

    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    prediction_id = upload(client, task_id, auth).json()["id"]
    assert predictions.claim(settings, Prediction, prediction_id)
    assert not predictions.claim(settings, Prediction, prediction_id)  # claimed once
    assert run_prediction(settings, prediction_id) == "skipped"  # a duplicate message
    with session_scope(settings) as session:
        assert session.get(Prediction, prediction_id).status == JobStatus.RUNNING
    assert client.delete(f"/api/v1/tasks/{task_id}", headers=auth).status_code == 200
    assert not predictions.finish(settings, Prediction, prediction_id, JobStatus.SUCCEEDED, result={})


def test_only_the_prediction_upload_is_exempt_from_the_request_body_limit(settings, client, setup):
    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    padding = "x" * (settings.max_request_body_bytes + 1)
    for path in (f"/api/v1/tasks/{task_id}/evaluations", "/api/v1/tasks"):
        response = client.post(
            path,
            content=f'{{"dataset_id": 1, "pad": "{padding}"}}',
            headers={**auth, "Content-Type": "application/json"},
        )
        assert response.status_code == 413 and "bytes accepted here" in response.json()["detail"], path
    # The upload's own limit (8 GiB by default) applies instead: a 3 MiB image is accepted.
    big = image_bytes("BMP", (1100, 1000))
    assert len(big) > settings.max_request_body_bytes
    response = upload(client, task_id, auth, big, name="big.bmp")
    assert response.status_code == 202, response.text


def test_jobs_left_queued_are_sent_again_and_lost_ones_fail(settings, client, setup):
    from datetime import timedelta

    from backend.models import Evaluation
    from backend.models.base import utcnow

    task_id, auth = setup["task_id"], setup["auth"]
    succeed(settings, task_id)
    queued = upload(client, task_id, auth).json()["id"]
    lost = upload(client, task_id, auth).json()["id"]
    evaluation = client.post(
        f"/api/v1/tasks/{task_id}/evaluations", json={"dataset_id": setup["dataset_id"]}, headers=auth
    ).json()["id"]
    assert predictions.claim(settings, Prediction, lost)
    with session_scope(settings) as session:
        # Just sent: nothing to do yet.
        assert predictions.keep_jobs_moving(session, settings) == {"resent": [], "failed": []}
    later = utcnow() + timedelta(seconds=settings.task_redispatch_after_seconds + 1)
    with session_scope(settings) as session:
        assert predictions.keep_jobs_moving(session, settings, later) == {
            "resent": [queued, evaluation],
            "failed": [],
        }
        # Sent again just now: not again at once.
        assert predictions.keep_jobs_moving(session, settings, later)["resent"] == []
    much_later = utcnow() + timedelta(seconds=settings.prediction_timeout_seconds + 1)
    with session_scope(settings) as session:
        outcome = predictions.keep_jobs_moving(session, settings, much_later)
    assert outcome["failed"] == [lost] and sorted(outcome["resent"]) == sorted([queued, evaluation])
    body = client.get(f"/api/v1/tasks/{task_id}/predictions/{lost}", headers=auth).json()
    assert body["status"] == "failed" and "the worker stopped" in body["error"]
    with session_scope(settings) as session:
        assert session.get(Evaluation, evaluation).status == JobStatus.QUEUED
