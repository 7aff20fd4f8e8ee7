"""`tessera serve`'s two workers as real processes: the training worker (tessera.training) and the
light worker (celery, tessera.light), started with serve's own command lines.

Each job-running process (a prefork pool child) appears on the workers API with its device and
queues, shows the training it runs (to its owner; "a task" to anyone else), and leaves when its
worker stops (deleted on a clean stop, offline after a kill). A plan is answered by the light
worker while the training worker is busy with a run. A CPU run over its memory budget succeeds
and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from backend.config import Settings
from backend.supervisor import child_environment, light_worker_command, training_worker_command
from backend.training import service
from backend.training.plans import plan_sentence
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bound on any one wait (worker start-up, a tiny run, a plan's first calibration: four fresh
#: interpreters importing torch) on a busy machine.
TIMEOUT_SECONDS = 900.0
SHORT = {
    "task_lease_seconds": 6.0,
    "task_reaper_interval_seconds": 1.0,
    "task_progress_interval_seconds": 0.3,
    "worker_heartbeat_seconds": 0.5,
}


@pytest.fixture
def fast_settings(settings: Settings, tmp_path: Path, tiny_calibration: Path) -> Settings:
    """The test's settings with a broker of its own, short intervals and the tiny runs' calibration."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_calibration, settings.data_dir / tiny_calibration.name)
    return settings.model_copy(
        update={
            "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "light_worker_concurrency": 1,
            **SHORT,
        }
    )


class Workers:
    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        env = child_environment(self.settings)
        for key, value in SHORT.items():
            env[f"TESSERA_{key.upper()}"] = str(value)
        log = self.folder / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = (process, log)
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-5000:]}" for _, log in self.started.values()
        )

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process, _ = self.started[name]
        if process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in self.started:
            self.stop(name)
        for process, _ in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def workers(fast_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(fast_settings, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def wait_until(
    workers: Workers, what: str, check: Callable[[], bool], timeout: float = TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{workers.logs()}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_serve_workers_show_up_run_tasks_answer_plans_meanwhile_and_leave(
    fast_settings, workers, make_client, make_user, bearer
):
    client = make_client(fast_settings)
    auth = bearer(client, make_user("owner"))
    stranger = bearer(client, make_user("stranger"))
    dataset_id = ready_dataset(fast_settings, client, auth, size=96)
    backbone_id = builtin_backbone(fast_settings)

    def api(path: str, headers: dict = auth) -> dict:
        response = client.get(f"/api/v1{path}", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def create(name: str, hyperparameters: dict, **extra) -> int:
        body = {"name": name, "dataset_id": dataset_id, "backbone_id": backbone_id, "algorithm": "patchgd"}
        response = client.post(
            "/api/v1/tasks", json={**body, "hyperparameters": hyperparameters, **extra}, headers=auth
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def rows(headers: dict = auth) -> list[dict]:
        return api("/workers", headers)["workers"]

    trainer = workers.start("training", training_worker_command(fast_settings))
    light = workers.start("light", light_worker_command(fast_settings))
    wait_until(workers, "both workers' rows", lambda: len([w for w in rows() if w["online"]]) == 2)
    by_queue = {tuple(w["queues"]): w for w in rows()}
    assert set(by_queue) == {("tessera.training",), ("celery", "tessera.light")}
    for row, worker in (
        (by_queue[("tessera.training",)], trainer),
        (by_queue[("celery", "tessera.light")], light),
    ):
        # The row is the pool child's, the process that runs the jobs, not the worker's main process.
        assert row["pid"] != worker.pid and psutil.Process(row["pid"]).ppid() == worker.pid
        assert row["device"]["kind"] == "cpu" and row["device"]["cores"] >= 1
        assert row["device"]["memory_bytes"] > 0 and row["device_text"].startswith("CPU, ")
        assert row["running"] is None
        assert row["node"].startswith(("tessera-training@", "tessera-light@"))

    # A CPU run over its budget is not stopped: it succeeds and says it went over.
    small = create("over budget", dict(TINY_PATCHGD, epochs=1), memory_budget_gib=0.01)
    wait_until(
        workers, "the over-budget run", lambda: api(f"/tasks/{small}")["status"] in service.TERMINAL_NAMES
    )
    body = api(f"/tasks/{small}")
    assert body["status"] == "succeeded", (body, workers.logs())
    memory = body["memory"]
    assert memory["budget_bytes"] == int(0.01 * (1 << 30)) < memory["peak_bytes"]
    assert memory["within_budget"] is False and memory["enforced"] is False and memory["device"] == "cpu"
    assert "exceeded the memory budget of 0.01 GiB" in memory["warning"]

    # A long run keeps the training worker busy...
    long = create("long run", dict(TINY_PATCHGD, epochs=50, batch_size=2))
    wait_until(
        workers,
        "the long run's first steps",
        lambda: (lambda b: b["status"] == "running" and b["progress"]["step"] >= 1)(api(f"/tasks/{long}")),
    )
    training_row = next(w for w in rows() if w["queues"] == ["tessera.training"])
    wait_until(
        workers,
        "the row to show the run",
        lambda: next(w for w in rows() if w["id"] == training_row["id"])["running"] is not None,
    )
    shown = next(w for w in rows() if w["id"] == training_row["id"])["running"]
    assert shown == {"job": "training.train", "label": "training", "task_id": long, "task_name": "long run"}
    hidden = next(w for w in rows(stranger) if w["id"] == training_row["id"])["running"]
    assert hidden["label"] == "a task" and hidden["task_id"] is None and hidden["task_name"] is None
    # ...the process named on the row is the one holding the task's lease.
    from backend.db import session_scope
    from backend.models import Task

    with session_scope(fast_settings) as session:
        assert session.get(Task, long).worker_id.split(":")[1] == str(training_row["pid"])
    assert api("/workers")["queues"]["tasks_running"] == 1

    # ...and a plan of both algorithms is answered meanwhile, by the light worker.
    asked = client.post(
        "/api/v1/tasks/plan",
        json={
            "dataset_id": dataset_id,
            "backbone_id": backbone_id,
            "algorithm": "patchgd",
            "algorithms": ["patchgd", "baseline"],
            "hyperparameters": dict(TINY_PATCHGD),
            "memory_budget_gib": 2,
        },
        headers=auth,
    )
    assert asked.status_code == 202, asked.text
    token = asked.json()["token"]
    wait_until(workers, "the plan", lambda: api(f"/tasks/plan/{token}")["status"] == "done")
    assert api(f"/tasks/{long}")["status"] == "running"  # the training never stopped for it
    plan = api(f"/tasks/plan/{token}")
    assert set(plan["report"]["algorithms"]) == {"patchgd", "baseline"}
    assert plan["summary"] == plan_sentence(plan["report"])
    light_row = next(w for w in rows() if w["queues"] == ["celery", "tessera.light"])
    assert plan["report"]["pid"] == light_row["pid"]

    assert client.post(f"/api/v1/tasks/{long}/cancel", headers=auth).status_code == 200
    wait_until(workers, "the cancel", lambda: api(f"/tasks/{long}")["status"] == "cancelled")
    wait_until(
        workers,
        "the training row to go idle",
        lambda: next(w for w in rows() if w["id"] == training_row["id"])["running"] is None,
    )

    # A clean stop removes the row; a killed worker's row goes offline.
    workers.stop("light")
    wait_until(workers, "the light row to go", lambda: all(w["id"] != light_row["id"] for w in rows()), 60)
    workers.stop("training", signal.SIGKILL)
    wait_until(
        workers,
        "the training row to go offline",
        lambda: not next(w for w in rows() if w["id"] == training_row["id"])["online"],
        60,
    )
