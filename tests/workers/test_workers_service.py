"""The workers page and API without worker processes: rows as workers write them, who may see
what a worker runs, offline and pruned rows, and a broker that never answers."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

from backend.db import session_scope
from backend.models import Role, Worker
from backend.models.base import utcnow
from backend.workers import service
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset

CPU = {"kind": "cpu", "cores": 4, "memory_bytes": 8 << 30}
GPU = {"kind": "cuda", "name": "NVIDIA H200", "memory_bytes": 141 << 30, "count": 1}


def _register(settings, pid: int, device: dict, queues: list[str]) -> int:
    return service.register(
        settings, node="tessera-training@host", hostname="host", pid=pid, queues=queues, device=device
    )


def test_workers_show_device_and_name_a_running_task_only_to_its_owner_or_an_admin(
    settings, make_client, make_user, bearer, login
):
    owner_client, other_client, admin_client = make_client(), make_client(), make_client()
    users = make_user("owner"), make_user("other"), make_user("boss", role=Role.ADMIN)
    clients = (owner_client, other_client, admin_client)
    owner, other, admin = (bearer(c, u) for c, u in zip(clients, users, strict=True))
    login(owner_client, users[0])
    login(other_client, users[1])
    dataset_id = ready_dataset(settings, owner_client, owner)
    backbone_id = builtin_backbone(settings)
    created = owner_client.post(
        "/api/v1/tasks",
        json={
            "name": "secret run",
            "dataset_id": dataset_id,
            "backbone_id": backbone_id,
            "hyperparameters": TINY_PATCHGD,
        },
        headers=owner,
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]

    trainer = _register(settings, 101, GPU, ["tessera.training"])
    light = _register(settings, 102, CPU, ["celery", "tessera.light"])
    assert service.beat(settings, trainer, job="training.train", task_id=task_id)
    assert service.beat(settings, light, job="memory.plan", task_id=None)

    def running_of(client, headers) -> dict:
        body = client.get("/api/v1/workers", headers=headers).json()
        assert body["queues"]["tasks_queued"] == 1 and body["queues"]["tasks_running"] == 0
        return {w["pid"]: w for w in body["workers"]}

    seen = running_of(owner_client, owner)
    assert seen[101]["device_text"] == "NVIDIA H200, 141.0 GiB" and seen[101]["online"]
    assert seen[102]["device_text"] == "CPU, 4 cores, 8.0 GiB RAM"
    assert seen[101]["queues"] == ["tessera.training"]
    assert seen[101]["running"] == {
        "job": "training.train",
        "label": "training",
        "task_id": task_id,
        "task_name": "secret run",
    }
    assert seen[102]["running"]["label"] == "planning memory"
    assert running_of(admin_client, admin)[101]["running"]["task_name"] == "secret run"
    hidden = running_of(other_client, other)[101]["running"]
    assert hidden == {"job": "task", "label": "a task", "task_id": None, "task_name": None}

    page = other_client.get("/workers")
    assert page.status_code == 200 and "a task" in page.text and "secret run" not in page.text
    assert 'href="/workers"' in page.text and "NVIDIA H200" in page.text
    assert "secret run" in owner_client.get("/workers/panel").text

    # Idle again: nothing is shown as running.
    assert service.beat(settings, trainer, job="", task_id=None)
    assert running_of(owner_client, owner)[101]["running"] is None


def test_silent_workers_go_offline_then_are_pruned_and_a_clean_stop_removes_the_row(
    settings, make_client, make_user, bearer, login
):
    client = make_client()
    user = make_user()
    auth = bearer(client, user)
    login(client, user)
    gone = _register(settings, 201, CPU, ["celery"])
    silent = _register(settings, 202, CPU, ["celery"])
    alive = _register(settings, 203, CPU, ["celery"])
    now = utcnow()
    with session_scope(settings) as session:
        session.get(Worker, silent).last_seen = now - service.offline_after(settings) - timedelta(seconds=1)
    service.unregister(settings, gone)

    workers = {w["pid"]: w for w in client.get("/api/v1/workers", headers=auth).json()["workers"]}
    assert set(workers) == {202, 203}
    assert workers[203]["online"] and not workers[202]["online"] and workers[202]["running"] is None
    assert "offline" in client.get("/workers").text

    # Pruned once silent for worker_prune_after_seconds (what the workers' own beats do).
    assert service.prune(settings, now + timedelta(seconds=settings.worker_prune_after_seconds - 40)) == 0
    assert service.prune(settings, now + timedelta(seconds=settings.worker_prune_after_seconds + 5)) == 2
    assert client.get("/api/v1/workers", headers=auth).json()["workers"] == []
    assert alive


def test_the_page_answers_in_bounded_time_when_the_broker_hangs(
    settings, make_client, make_user, bearer, login
):
    # A "broker" that accepts connections and never says a word.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        hung = settings.model_copy(
            update={
                "broker_url": f"redis://127.0.0.1:{server.getsockname()[1]}/0",
                "health_broker_timeout_seconds": 0.5,
            }
        )
        client = make_client(hung)
        user = make_user()
        auth = bearer(client, user)
        login(client, user)
        for _ in range(3):
            started = time.monotonic()
            body = client.get("/api/v1/workers", headers=auth).json()
            assert time.monotonic() - started < 5
            assert body["queues"]["broker"] is None and body["queues"]["tasks_queued"] == 0
        page = client.get("/workers")
        assert page.status_code == 200 and "did not tell its queue lengths" in page.text
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_the_broker_tells_its_queue_lengths(settings, make_client, make_user, bearer):
    client = make_client()
    auth = bearer(client, make_user())
    broker = client.get("/api/v1/workers", headers=auth).json()["queues"]["broker"]
    assert broker is not None and set(broker) == {"tessera.training", "tessera.light", "celery"}
    assert all(isinstance(n, int) and n >= 0 for n in broker.values())


def test_anonymous_callers_are_refused(client):
    assert client.get("/api/v1/workers").status_code == 401
