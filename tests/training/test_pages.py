"""The task pages: the list (live rows), the create form (engine errors shown by field), a task's
page (status panel, epoch table, chart containers, confusion matrix, actions), all behind CSRF."""

from __future__ import annotations

from sqlalchemy import update

from backend.db import session_scope
from backend.models import Task, TaskMetric, TaskStatus
from tests.training.helpers import builtin_backbone, ready_dataset


def test_create_from_the_form_and_see_the_task(client, make_user, login, settings):
    token = login(client, make_user())
    headers = {"X-CSRF-Token": token}
    assert "No training tasks yet" in client.get("/tasks").text
    dataset_id = ready_dataset(settings, client, headers)
    backbone_id = builtin_backbone(settings)
    form = client.get("/tasks/new").text
    assert 'id="task-form"' in form and f'value="{dataset_id}"' in form and 'placeholder="512"' in form

    fields = {
        "csrf_token": token,
        "name": "from the page",
        "dataset_id": str(dataset_id),
        "backbone_id": str(backbone_id),
        "algorithm": "patchgd",
        "image_size": "64",
        "patch_size": "48",
        "lr": "0.5",  # a baseline field: ignored for PatchGD
    }
    refused = client.post("/tasks/new", data=fields)
    assert refused.status_code == 422 and "image_size: image_size 64 is not a multiple" in refused.text
    assert client.post("/tasks/new", data={**fields, "csrf_token": ""}).status_code == 403

    created = client.post("/tasks/new", data={**fields, "patch_size": "32", "epochs": "2"})
    assert created.status_code == 303
    task_id = int(created.headers["location"].rsplit("/", 1)[1])
    with session_scope(settings) as session:
        task = session.get(Task, task_id)
        assert task.hyperparameters["patch_size"] == 32 and task.hyperparameters["epochs"] == 2

    listing = client.get("/tasks").text
    assert 'data-status="queued"' in listing and 'hx-get="/tasks/rows"' in listing
    assert "position 1 in the queue" in listing
    page = client.get(f"/tasks/{task_id}").text
    assert 'id="task-status"' in page and 'id="cancel-task"' in page and 'hx-get="/tasks/' in page

    # A run with two epochs behind it and a final evaluation: table, chart, confusion matrix.
    with session_scope(settings) as session:
        for epoch, (loss, acc) in enumerate([(0.9, 0.5), (0.6, 0.75)]):
            session.add(
                TaskMetric(
                    task_id=task_id,
                    epoch=epoch,
                    train_loss=loss,
                    val_loss=loss + 0.1,
                    val_accuracy=acc,
                    val_qwk=0.1,
                    lr=1e-3,
                    lrs={},
                    peak_memory_bytes=2**20,
                    images_per_s=3.0,
                    patches_per_s=12.0,
                    seconds=1.5,
                )
            )
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(
                status=TaskStatus.SUCCEEDED,
                attempts=1,
                fraction=1.0,
                final_metrics={
                    "split": "test",
                    "accuracy": 0.75,
                    "qwk": 0.5,
                    "num_samples": 4,
                    "classes": ["cat", "dog"],
                    "confusion_matrix": [[2, 0], [1, 1]],
                    "per_class_recall": [1.0, 0.5],
                },
            )
        )
    page = client.get(f"/tasks/{task_id}").text
    # Nothing polls once the run ended (the predict and evaluate panels load once, then poll only
    # while one of their jobs is pending).
    assert 'data-status="succeeded"' in page and 'hx-trigger="every' not in page
    assert 'id="task-charts"' in page and f'data-metrics-url="/api/v1/tasks/{task_id}/metrics"' in page
    assert page.count('<tr data-epoch="') == 2 and 'id="confusion-matrix"' in page and "0.50" in page
    assert 'id="retry-task"' not in page and 'id="delete-task"' in page
    status = client.get(f"/tasks/{task_id}/status?epochs=2")
    assert status.headers.get("HX-Refresh") == "true"  # ended: the page reloads to show the results

    clone = client.post(f"/tasks/{task_id}/clone", data={"csrf_token": token, "algorithm": "baseline"})
    assert clone.status_code == 303
    clone_id = int(clone.headers["location"].rsplit("/", 1)[1])
    assert "Clone as PatchGD" in client.get(f"/tasks/{clone_id}").text
    assert client.post(f"/tasks/{clone_id}/cancel", data={"csrf_token": token}).status_code == 303
    assert 'id="retry-task"' in client.get(f"/tasks/{clone_id}").text
    assert client.post(f"/tasks/{clone_id}/delete", data={"csrf_token": token}).status_code == 303
    assert client.get(f"/tasks/{clone_id}").status_code == 404


def test_another_users_task_page_is_not_found(client, make_client, make_user, login, settings):
    token = login(client, make_user())
    dataset_id = ready_dataset(settings, client, {"X-CSRF-Token": token})
    backbone_id = builtin_backbone(settings)
    created = client.post(
        "/tasks/new",
        data={
            "csrf_token": token,
            "name": "mine",
            "dataset_id": str(dataset_id),
            "backbone_id": str(backbone_id),
            "image_size": "64",
            "patch_size": "32",
        },
    )
    task_id = int(created.headers["location"].rsplit("/", 1)[1])
    other = make_client()
    other_token = login(other, make_user())
    assert other.get(f"/tasks/{task_id}").status_code == 404
    assert other.get(f"/tasks/{task_id}/status").status_code == 404
    assert other.post(f"/tasks/{task_id}/cancel", data={"csrf_token": other_token}).status_code == 404
    assert "mine" not in other.get("/tasks").text
