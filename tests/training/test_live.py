"""The live view's data without a worker: the event log (written by the service functions a worker
calls, capped per task), patch coverage and peak memory on the row, the JSON endpoints (metrics
after an epoch, events after an id, coverage) with their 404s for another user, and the polled
status fragment that carries only what the page does not have yet."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select, update

from backend.db import session_scope
from backend.models import TASK_EVENTS_KEPT, Task, TaskEvent
from backend.training import service
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset

WORKER = "host:1:abc"


def _metrics(epoch: int, peak: int) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 - 0.1 * epoch,
        "val_loss": 1.1 - 0.1 * epoch,
        "val_accuracy": 0.5 + 0.1 * epoch,
        "val_qwk": 0.2,
        "lr": 1e-3,
        "lrs": {"backbone": 1e-3, "head": 1e-3},
        "peak_memory_bytes": peak,
        "images_per_s": 4.0,
        "patches_per_s": 16.0,
        "seconds": 2.0,
    }


@pytest.fixture
def running(settings, client, make_user, login):
    """A PatchGD task claimed by a worker (through the service) with two epochs recorded and the
    coverage of a 2×2 grid written by a heartbeat, as a worker writes them; signed in as its owner."""
    user = make_user()
    token = login(client, user)
    dataset_id = ready_dataset(settings, client, {"X-CSRF-Token": token})
    backbone_id = builtin_backbone(settings)
    body = {
        "name": "live",
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "hyperparameters": TINY_PATCHGD,
        "memory_budget_gib": 0.001,  # 1 MiB: the second epoch's 2 MiB peak is over it
    }
    created = client.post("/api/v1/tasks", json=body, headers={"X-CSRF-Token": token})
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    with session_scope(settings) as session:
        assert service.claim(session, settings, task_id, WORKER) == "claimed"
    assert service.record_epoch(settings, task_id, WORKER, _metrics(0, 2**19))
    assert service.record_epoch(settings, task_id, WORKER, _metrics(1, 2**21))
    mine, cancel = service.heartbeat(
        settings,
        task_id,
        WORKER,
        step=6,
        total_steps=8,
        fraction=0.75,
        peak_memory_bytes=2**20,  # lower than the recorded peak: the row keeps the higher one
        patch_coverage={"n": 2, "counts": [8, 4, 4, 8], "sampled": 24},
    )
    assert mine and not cancel
    return {"id": task_id, "token": token, "user": user}


def test_events_coverage_and_metrics_endpoints(client, running, make_client, login, make_user):
    task_id = running["id"]
    events = client.get(f"/api/v1/tasks/{task_id}/events").json()
    assert [e["kind"] for e in events] == ["claimed", "epoch", "epoch"]
    assert events[0]["worker_id"] == WORKER and events[0]["attempt"] == 1
    assert "attempt 1" in events[0]["message"]
    assert (
        events[2]["message"].startswith("Epoch 2 done: train loss 0.9000") and events[2]["data"]["epoch"] == 1
    )
    newer = client.get(f"/api/v1/tasks/{task_id}/events?after={events[0]['id']}").json()
    assert [e["id"] for e in newer] == [events[1]["id"], events[2]["id"]]
    assert client.get(f"/api/v1/tasks/{task_id}/events?after={events[2]['id']}").json() == []
    assert [e["id"] for e in client.get(f"/api/v1/tasks/{task_id}/events?limit=1").json()] == [
        events[2]["id"]
    ]
    assert client.get(f"/api/v1/tasks/{task_id}/events?after=-1").status_code == 422

    coverage = client.get(f"/api/v1/tasks/{task_id}/coverage").json()
    assert coverage == {"n": 2, "counts": [8, 4, 4, 8], "sampled": 24, "min": 4, "max": 8}
    read = client.get(f"/api/v1/tasks/{task_id}").json()
    assert read["patch_coverage"] == coverage and read["peak_memory_bytes"] == 2**21
    assert client.get("/api/v1/tasks").json()[0]["patch_coverage"] is None  # the list stays light

    assert [m["epoch"] for m in client.get(f"/api/v1/tasks/{task_id}/metrics").json()] == [0, 1]
    assert [m["epoch"] for m in client.get(f"/api/v1/tasks/{task_id}/metrics?after=0").json()] == [1]
    assert client.get(f"/api/v1/tasks/{task_id}/metrics?after=1").json() == []

    other = make_client()
    login(other, make_user())
    for path in ("events", "coverage", "metrics"):
        assert other.get(f"/api/v1/tasks/{task_id}/{path}").status_code == 404
    assert other.get(f"/tasks/{task_id}/status?epochs=0&event=0").status_code == 404


def test_cancel_and_finish_are_logged(client, running, settings):
    from backend.models import TaskStatus

    task_id = running["id"]
    response = client.post(f"/api/v1/tasks/{task_id}/cancel", headers={"X-CSRF-Token": running["token"]})
    assert response.status_code == 200 and response.json()["cancel_requested"]
    assert service.finish(settings, task_id, WORKER, TaskStatus.FAILED, error="The images are unreadable.")
    kinds = [(e["kind"], e["message"]) for e in client.get(f"/api/v1/tasks/{task_id}/events").json()]
    assert kinds[3][0] == "cancel_requested"
    assert kinds[4:] == [("error", "The images are unreadable."), ("finished", "Finished: failed.")]


def test_the_log_keeps_the_newest_lines(settings, running):
    task_id = running["id"]
    with session_scope(settings) as session:
        for i in range(TASK_EVENTS_KEPT + 7):
            service.add_event(session, task_id, "epoch", f"line {i}")
    with session_scope(settings) as session:
        kept = session.scalars(
            select(TaskEvent.message).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        ).all()
    assert len(kept) == TASK_EVENTS_KEPT
    assert kept[0] == "line 7" and kept[-1] == f"line {TASK_EVENTS_KEPT + 6}"


def test_deleting_a_task_deletes_its_log(settings, client, running):
    from backend.models import TaskStatus

    task_id = running["id"]
    assert service.finish(settings, task_id, WORKER, TaskStatus.CANCELLED)
    assert (
        client.delete(f"/api/v1/tasks/{task_id}", headers={"X-CSRF-Token": running["token"]}).status_code
        == 200
    )
    with session_scope(settings) as session:
        assert session.scalar(select(func.count(TaskEvent.id)).where(TaskEvent.task_id == task_id)) == 0


def test_the_polled_fragment_carries_only_what_is_new(client, running, settings):
    task_id = running["id"]
    page = client.get(f"/tasks/{task_id}").text
    assert page.count('<tr data-epoch="') == 2 and page.count("data-event=") >= 3
    assert '<script src="/static/vendor/uplot/uPlot.iife.min.js" defer>' in page
    assert 'id="memory-over"' in page  # a 2 MiB peak against a 1 MiB budget
    events = client.get(f"/api/v1/tasks/{task_id}/events").json()

    # The page has epoch 1 and the first event: the answer brings epoch 2 and the two newer lines.
    fragment = client.get(f"/tasks/{task_id}/status?epochs=1&event={events[0]['id']}")
    assert fragment.status_code == 200 and "HX-Refresh" not in fragment.headers
    html = fragment.text
    assert re.findall(r'<tr data-epoch="(\d+)"', html) == ["1"]
    assert 'hx-swap-oob="beforeend:#epoch-rows"' in html
    assert re.findall(r'<li data-event="(\d+)"', html) == [str(events[1]["id"]), str(events[2]["id"])]
    assert f"event={events[2]['id']}" in html and "epochs=2" in html  # the next poll asks from there
    # The heatmap: 4 cells, the sampled counts in them, the legend's range.
    cells = re.findall(
        r'<rect x="\d+" y="\d+" width="24" height="24" fill="#[0-9a-f]{6}" data-count="(\d+)"', html
    )
    assert cells == ["8", "4", "4", "8"]
    assert "24 patches sampled over the 2×2 grid" in html
    assert 'id="memory-meter"' in html and "Over budget by 1" in html

    # Up to date: no rows, no lines.
    quiet = client.get(f"/tasks/{task_id}/status?epochs=2&event={events[2]['id']}").text
    assert "<tr data-epoch" not in quiet and "<li data-event" not in quiet

    # The run ended: the page reloads itself once to show the results.
    with session_scope(settings) as session:
        session.execute(update(Task).where(Task.id == task_id).values(lease_expires_at=None))
    from backend.models import TaskStatus

    assert service.finish(settings, task_id, WORKER, TaskStatus.SUCCEEDED, final_metrics={})
    ended = client.get(f"/tasks/{task_id}/status?epochs=2&event={events[2]['id']}")
    assert ended.headers.get("HX-Refresh") == "true"
