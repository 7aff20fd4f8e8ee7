"""The task page's predict and evaluate sections: helpful empty states, the panels HTMX loads
(polling while a job is pending), the evaluate form (CSRF, refusals shown as messages) and 404 for
another user's task."""

from __future__ import annotations

import pytest

from tests.datasets_worker.builders import image_bytes
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset
from tests.training.test_predictions_api import succeed


@pytest.fixture
def page(settings, client, make_user, login):
    user = make_user()
    token = login(client, user)
    headers = {"X-CSRF-Token": token}
    dataset_id = ready_dataset(settings, client, headers)
    backbone_id = builtin_backbone(settings)
    body = {
        "name": "run",
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
    }
    task = client.post("/api/v1/tasks", json=body, headers=headers)
    assert task.status_code == 201, task.text
    return {"token": token, "headers": headers, "task_id": task.json()["id"], "dataset_id": dataset_id}


def test_before_the_task_succeeded_the_sections_say_what_will_be_possible(client, page):
    html = client.get(f"/tasks/{page['task_id']}").text
    assert 'id="predictions"' in html and 'id="evaluations"' in html
    assert 'id="predict-unavailable"' in html and "heatmap of the evidence of each patch" in html
    assert 'id="evaluate-unavailable"' in html and 'id="predict-form"' not in html


def test_a_succeeded_task_offers_the_forms_and_lists_what_was_asked(settings, client, page):
    task_id = page["task_id"]
    succeed(settings, task_id)
    html = client.get(f"/tasks/{task_id}").text
    assert 'id="predict-form"' in html and f'action="/api/v1/tasks/{task_id}/predictions"' in html
    assert f'value="{page["token"]}"' in html and "/static/js/predict.js" in html
    assert f'hx-get="/tasks/{task_id}/predictions/panel"' in html
    assert f'hx-get="/tasks/{task_id}/evaluations/panel"' in html
    empty = client.get(f"/tasks/{task_id}/predictions/panel").text
    assert 'id="predictions-empty"' in empty and "every 2s" not in empty
    # A browser upload (the CSRF token in the header, as predict.js sends it).
    upload = client.post(
        f"/api/v1/tasks/{task_id}/predictions",
        files={"file": ("tissue.png", image_bytes("PNG", (40, 30)), "image/png")},
        headers=page["headers"],
    )
    assert upload.status_code == 202, upload.text
    panel = client.get(f"/tasks/{task_id}/predictions/panel").text
    assert "tissue.png" in panel and "Waiting for a worker" in panel and 'hx-trigger="every 2s"' in panel

    evaluations = client.get(f"/tasks/{task_id}/evaluations/panel").text
    assert 'id="evaluate-form"' in evaluations and 'id="evaluations-empty"' in evaluations
    assert f'<option value="{page["dataset_id"]}">' in evaluations and "cat, dog" in evaluations


def test_the_evaluate_form_queues_or_explains_and_needs_csrf(settings, client, page):
    task_id = page["task_id"]
    succeed(settings, task_id)
    no_csrf = client.post(f"/tasks/{task_id}/evaluations", data={"dataset_id": str(page["dataset_id"])})
    assert no_csrf.status_code == 403
    owls = ready_dataset(settings, client, page["headers"], name="owls", classes=("cat", "owl"))
    refused = client.post(
        f"/tasks/{task_id}/evaluations", data={"dataset_id": str(owls), "csrf_token": page["token"]}
    )
    assert refused.status_code == 303 and refused.headers["location"] == f"/tasks/{task_id}#evaluations"
    shown = client.get(f"/tasks/{task_id}").text
    assert "other classes than the task" in shown
    queued = client.post(
        f"/tasks/{task_id}/evaluations",
        data={"dataset_id": str(page["dataset_id"]), "csrf_token": page["token"]},
    )
    assert queued.status_code == 303
    panel = client.get(f"/tasks/{task_id}/evaluations/panel").text
    assert 'id="evaluation-' in panel and "Waiting for a worker" in panel and 'hx-trigger="every 2s"' in panel


def test_another_user_s_task_panels_and_form_are_404(settings, make_client, make_user, login, page):
    succeed(settings, page["task_id"])
    other = make_client()
    token = login(other, make_user())
    task_id = page["task_id"]
    assert other.get(f"/tasks/{task_id}/predictions/panel").status_code == 404
    assert other.get(f"/tasks/{task_id}/evaluations/panel").status_code == 404
    response = other.post(
        f"/tasks/{task_id}/evaluations", data={"dataset_id": str(page["dataset_id"]), "csrf_token": token}
    )
    assert response.status_code == 404
