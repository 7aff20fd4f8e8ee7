"""The tasks API and the service rules that need no worker: validation, ownership, cancel, retry,
clone, delete, the in-use checks, the claim's per-user limit, the reaper and the re-dispatcher."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from backend.db import session_scope
from backend.models import Task, TaskStatus
from backend.models.base import utcnow
from backend.training import service
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset


@pytest.fixture
def setup(settings, client, make_user, bearer):
    user = make_user()
    auth = bearer(client, user)
    dataset_id = ready_dataset(settings, client, auth)
    backbone_id = builtin_backbone(settings)
    return {"auth": auth, "dataset_id": dataset_id, "backbone_id": backbone_id, "user": user}


def create(client, setup, **overrides):  # noqa: ANN001, ANN201
    body = {
        "name": "first run",
        "dataset_id": setup["dataset_id"],
        "backbone_id": setup["backbone_id"],
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
        **overrides,
    }
    return client.post("/api/v1/tasks", json=body, headers=setup["auth"])


def set_row(settings, task_id: int, **values) -> None:  # noqa: ANN001
    with session_scope(settings) as session:
        session.execute(update(Task).where(Task.id == task_id).values(**values))


def test_create_fills_engine_defaults_and_queues(client, setup):
    response = create(client, setup)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["status"] == "queued" and task["queue_position"] == 1 and task["attempts"] == 0
    hp = task["hyperparameters"]
    assert hp["num_classes"] == 2 and hp["backbone"] == "resnet18"
    assert hp["image_size"] == 64 and hp["latent_dim"] == 256  # given, and the engine default
    assert hp["checkpoint_every_minutes"] == 5.0
    assert "pretrained_weights" not in hp
    second = create(client, setup, name="second").json()
    assert second["queue_position"] == 2
    listed = client.get("/api/v1/tasks", headers=setup["auth"]).json()
    assert [t["id"] for t in listed] == [second["id"], task["id"]]
    assert client.get(f"/api/v1/tasks/{task['id']}/metrics", headers=setup["auth"]).json() == []


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"image_size": 64, "patch_size": 48}, "image_size"),
        ({"epochs": 0}, "epochs"),
        ({"no_such_thing": 1}, "no_such_thing"),
        ({"num_classes": 5}, "num_classes"),
        ({"pretrained_weights": "/etc/passwd"}, "pretrained_weights"),
        ({"lr": 0.1}, "lr"),  # a baseline hyperparameter, not a PatchGD one
    ],
)
def test_hyperparameter_errors_name_the_field(client, setup, hyperparameters, field):
    response = create(client, setup, hyperparameters=hyperparameters)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error"
    assert [item["field"] for item in body["detail"]] == [field]
    assert body["detail"][0]["message"]


def test_dataset_and_backbone_must_be_ready_and_visible(settings, client, setup, make_user, bearer):
    other = bearer(client, make_user())
    response = client.post(
        "/api/v1/tasks",
        json={"name": "x", "dataset_id": setup["dataset_id"], "backbone_id": setup["backbone_id"]},
        headers=other,
    )
    assert response.status_code == 404
    assert create(client, setup, backbone_id=999_999).status_code == 404


def test_another_users_task_is_not_found_everywhere(client, setup, make_user, bearer):
    task_id = create(client, setup).json()["id"]
    other = bearer(client, make_user())
    assert client.get(f"/api/v1/tasks/{task_id}", headers=other).status_code == 404
    assert client.get(f"/api/v1/tasks/{task_id}/metrics", headers=other).status_code == 404
    for action in ("cancel", "retry", "clone"):
        assert client.post(f"/api/v1/tasks/{task_id}/{action}", headers=other).status_code == 404, action
    assert client.delete(f"/api/v1/tasks/{task_id}", headers=other).status_code == 404
    assert client.get("/api/v1/tasks", headers=other).json() == []
    assert client.get(f"/api/v1/tasks/{task_id}", headers=setup["auth"]).status_code == 200


def test_cancel_retry_clone_delete(settings, client, setup):
    auth = setup["auth"]
    task_id = create(client, setup).json()["id"]
    cancelled = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    assert client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth).status_code == 409
    retried = client.post(f"/api/v1/tasks/{task_id}/retry", headers=auth).json()
    assert retried["status"] == "queued" and retried["attempts"] == 0
    assert client.post(f"/api/v1/tasks/{task_id}/retry", headers=auth).status_code == 409

    clone = client.post(f"/api/v1/tasks/{task_id}/clone", json={"algorithm": "baseline"}, headers=auth)
    assert clone.status_code == 201, clone.text
    body = clone.json()
    assert body["algorithm"] == "baseline" and body["name"] == "first run (baseline)"
    assert body["hyperparameters"]["image_size"] == 64 and "patch_size" not in body["hyperparameters"]
    same = client.post(f"/api/v1/tasks/{task_id}/clone", headers=auth).json()
    assert same["algorithm"] == "patchgd" and same["hyperparameters"]["patch_size"] == 32

    # A running task: cancel asks the worker; delete is refused until it ended.
    set_row(settings, task_id, status=TaskStatus.RUNNING, worker_id="w", lease_expires_at=utcnow())
    assert client.delete(f"/api/v1/tasks/{task_id}", headers=auth).status_code == 409
    assert client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth).json()["cancel_requested"] is True
    set_row(settings, task_id, status=TaskStatus.CANCELLED)
    folder = service.task_dir(settings, task_id)
    folder.mkdir(parents=True)
    assert client.delete(f"/api/v1/tasks/{task_id}", headers=auth).json() == {
        "id": task_id,
        "status": "deleted",
    }
    assert not folder.exists()
    assert client.get(f"/api/v1/tasks/{task_id}", headers=auth).status_code == 404


def test_a_dataset_used_by_a_task_cannot_be_deleted(client, setup):
    task_id = create(client, setup).json()["id"]
    refused = client.delete(f"/api/v1/datasets/{setup['dataset_id']}", headers=setup["auth"])
    assert refused.status_code == 409 and "training task" in refused.json()["detail"]
    client.post(f"/api/v1/tasks/{task_id}/cancel", headers=setup["auth"])
    client.delete(f"/api/v1/tasks/{task_id}", headers=setup["auth"])
    assert client.delete(f"/api/v1/datasets/{setup['dataset_id']}", headers=setup["auth"]).status_code == 200


def test_claim_respects_the_per_user_limit_and_is_conditional(settings, client, setup):
    limited = settings.model_copy(update={"max_running_tasks_per_user": 1})
    first = create(client, setup).json()["id"]
    second = create(client, setup, name="second").json()["id"]
    with session_scope(limited) as session:
        assert service.claim(session, limited, first, "worker-a") == "claimed"
    with session_scope(limited) as session:
        assert service.claim(session, limited, first, "worker-b") == "skipped"  # a duplicate message
        assert service.claim(session, limited, second, "worker-b") == "waiting"
    body = client.get(f"/api/v1/tasks/{second}", headers=setup["auth"]).json()
    assert body["status"] == "queued" and body["queue_position"] == 1
    # The running task's end frees the slot and sends the waiting one.
    assert service.finish(limited, first, "worker-a", TaskStatus.SUCCEEDED)
    assert not service.finish(limited, first, "worker-a", TaskStatus.FAILED)  # not running any more
    with session_scope(limited) as session:
        assert session.get(Task, second).dispatched_at is not None
        assert service.claim(session, limited, second, "worker-b") == "claimed"


def test_reaper_requeues_then_fails_after_max_attempts(settings, client, setup):
    task_id = create(client, setup).json()["id"]
    expired = utcnow() - timedelta(seconds=1)
    set_row(
        settings, task_id, status=TaskStatus.RUNNING, attempts=1, max_attempts=2, lease_expires_at=expired
    )
    with session_scope(settings) as session:
        assert service.reap(session, settings) == {"requeued": [task_id], "failed": []}
    body = client.get(f"/api/v1/tasks/{task_id}", headers=setup["auth"]).json()
    assert body["status"] == "queued" and "resuming" in body["error"]
    # A lease that is still valid is left alone.
    set_row(settings, task_id, status=TaskStatus.RUNNING, lease_expires_at=utcnow() + timedelta(minutes=1))
    with session_scope(settings) as session:
        assert service.reap(session, settings) == {"requeued": [], "failed": []}
    set_row(settings, task_id, attempts=2, lease_expires_at=expired)
    with session_scope(settings) as session:
        assert service.reap(session, settings) == {"requeued": [], "failed": [task_id]}
    body = client.get(f"/api/v1/tasks/{task_id}", headers=setup["auth"]).json()
    assert body["status"] == "failed" and "stopped responding" in body["error"]


def test_redispatcher_resends_stale_queued_tasks_within_the_limit(settings, client, setup):
    limited = settings.model_copy(update={"max_running_tasks_per_user": 1})
    first = create(client, setup).json()["id"]
    second = create(client, setup, name="second").json()["id"]
    with session_scope(limited) as session:
        assert service.redispatch(session, limited) == []  # both were just sent
    old = utcnow() - timedelta(hours=1)
    set_row(settings, first, dispatched_at=old)
    set_row(settings, second, dispatched_at=old)
    with session_scope(limited) as session:
        assert service.redispatch(session, limited) == [first]  # one free slot for this owner
    with session_scope(limited) as session:
        assert service.redispatch(session, limited) == []


def test_only_a_succeeded_task_has_a_model(client, setup):
    task_id = create(client, setup).json()["id"]
    queued = client.get(f"/api/v1/tasks/{task_id}/model", headers=setup["auth"])
    assert queued.status_code == 409 and "only a succeeded task" in queued.json()["detail"]
    assert (
        client.get(f"/api/v1/tasks/{task_id}/model?format=pickle", headers=setup["auth"]).status_code == 422
    )


def test_a_plan_is_requested_with_checked_settings_and_read_back_by_its_owner_only(
    settings, client, setup, make_user, bearer
):
    body = {
        "dataset_id": setup["dataset_id"],
        "backbone_id": setup["backbone_id"],
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
        "memory_budget_gib": 4,
    }
    bad = client.post(
        "/api/v1/tasks/plan", json={**body, "hyperparameters": {"epochs": 0}}, headers=setup["auth"]
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "epochs"
    asked = client.post("/api/v1/tasks/plan", json=body, headers=setup["auth"])
    assert asked.status_code == 202, asked.text
    token = asked.json()["token"]
    pending = client.get(f"/api/v1/tasks/plan/{token}", headers=setup["auth"]).json()
    assert pending == {"token": token, "status": "planning", "report": None, "summary": None, "error": None}
    other = bearer(client, make_user())
    assert client.get(f"/api/v1/tasks/plan/{token}", headers=other).status_code == 404
    assert client.get("/api/v1/tasks/plan/..%2Fsecret", headers=setup["auth"]).status_code == 404
