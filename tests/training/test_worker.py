"""Training tasks on real processes: the Celery worker started with the command line `tessera serve`
uses (prefork, the training queue), Celery beat for the reaper, tasks created through the API.

Tiny runs on CPU (resnet18, 64-128 px, a few dozen steps). The lease, the reaper's interval and the
progress interval are shortened through the settings the worker reads from its environment, so a
killed worker's task is requeued within seconds. Each test has its own broker file, so no message
of another test reaches these workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.config import Settings
from backend.datasets.service import REPORT_FILE, dataset_dir
from backend.supervisor import beat_command, child_environment, worker_command
from backend.training import service
from tests.conftest import production_database
from tests.training.helpers import TINY_BASELINE, TINY_PATCHGD, builtin_backbone, pyramid_zip, ready_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

#: Bound on any one wait (worker start-up, importing torch, a tiny run) on a busy 2-core machine.
TIMEOUT_SECONDS = 180.0
SHORT = {
    "task_lease_seconds": 6.0,
    "task_reaper_interval_seconds": 1.0,
    "task_redispatch_after_seconds": 5.0,
    "task_progress_interval_seconds": 0.3,
}


@pytest.fixture
def fast_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with a broker of its own and short leases."""
    return settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}", **SHORT})


class Processes:
    """Workers and beat started for one test; whatever is still running is stopped at the end."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def env(self) -> dict[str, str]:
        env = child_environment(self.settings)
        for name, value in SHORT.items():
            env[f"TESSERA_{name.upper()}"] = str(value)
        env["TESSERA_TASK_MAX_ATTEMPTS"] = str(self.settings.task_max_attempts)
        return env

    def start(self, kind: str) -> subprocess.Popen[bytes]:
        command = worker_command(self.settings) if kind == "worker" else beat_command(self.settings)
        log = self.folder / f"{kind}-{len(self.started)}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((process, log))
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}" for _, log in self.started
        )

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children at once, like a machine that lost power."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(fast_settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    started = Processes(fast_settings, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def api(fast_settings, make_client, make_user, bearer):  # noqa: ANN001, ANN201
    """A client of an app with the test's settings, a signed-in user, a ready dataset and resnet18."""
    client = make_client(fast_settings)
    auth = bearer(client, make_user())
    dataset_id = ready_dataset(fast_settings, client, auth, size=96)
    backbone_id = builtin_backbone(fast_settings)

    def create(name: str, algorithm: str, hyperparameters: dict, **fields: object) -> dict:
        response = client.post(
            "/api/v1/tasks",
            json={
                "name": name,
                "dataset_id": dataset_id,
                "backbone_id": backbone_id,
                "algorithm": algorithm,
                "hyperparameters": hyperparameters,
                **fields,
            },
            headers=auth,
        )
        assert response.status_code == 201, response.text
        return response.json()

    def get(path: str) -> dict | list:
        response = client.get(f"/api/v1/tasks{path}", headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    def post(path: str) -> dict:
        return client.post(f"/api/v1/tasks{path}", headers=auth).json()

    return SimpleNamespace(
        create=create, get=get, post=post, client=client, auth=auth, backbone_id=backbone_id
    )


def wait_until(
    processes: Processes,
    what: str,
    check: Callable[[], bool],
    timeout: float = TIMEOUT_SECONDS,
    ended: Callable[[], bool] | None = None,
) -> None:
    """Poll ``check`` until it holds; fail with the process logs on a timeout or once ``ended``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert ended is None or not ended(), f"ended before {what}\n{processes.logs()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{processes.logs()}"
        time.sleep(0.1)


def status_of(api, task_id: int) -> str:  # noqa: ANN001
    return api.get(f"/{task_id}")["status"]


@pytest.mark.slow
@production_database
def test_patchgd_and_baseline_succeed_and_a_cancel_ends_a_run(fast_settings, processes, api):
    """On the production database only: on SQLite, tests/e2e/test_workflow.py trains, watches,
    downloads and predicts through ``tessera serve``'s real worker, and the events, coverage,
    metrics and cancel endpoints are tested on both databases in tests/training/test_live.py."""
    worker = processes.start("worker")
    patchgd = api.create("patchgd", "patchgd", dict(TINY_PATCHGD, epochs=2))
    baseline = api.create("baseline", "baseline", TINY_BASELINE)
    for task in (patchgd, baseline):
        wait_until(
            processes,
            f"task {task['name']}",
            lambda t=task: status_of(api, t["id"]) in service.TERMINAL_NAMES,
        )
        body = api.get(f"/{task['id']}")
        assert body["status"] == "succeeded", (body, processes.logs())
        assert body["attempts"] == 1 and body["progress"]["fraction"] == 1.0 and body["error"] == ""
        final = body["final_metrics"]
        assert final["split"] == "test" and final["classes"] == ["cat", "dog"]
        assert 0.0 <= final["accuracy"] <= 1.0 and len(final["per_class_recall"]) == 2
        assert sum(map(sum, final["confusion_matrix"])) == final["num_samples"] > 0
        metrics = api.get(f"/{task['id']}/metrics")
        assert [m["epoch"] for m in metrics] == list(range(body["hyperparameters"]["epochs"]))
        assert all(m["val_accuracy"] is not None and m["train_loss"] > 0 for m in metrics)
        assert body["best"]["epoch"] in {m["epoch"] for m in metrics}
    # The live view's data: the log of the run and the patch coverage, as the worker wrote them.
    kinds = [e["kind"] for e in api.get(f"/{patchgd['id']}/events")]
    assert kinds == ["claimed", "checkpoint", "epoch", "checkpoint", "epoch", "finished"], kinds
    coverage = api.get(f"/{patchgd['id']}/coverage")
    # A 2×2 grid, k = 1, one full sweep per image per step: every cell sampled once per training
    # image per epoch, so the counts sum to the patches sampled (2 epochs × images × 4 cells).
    report = json.loads((dataset_dir(fast_settings, patchgd["dataset_id"]) / REPORT_FILE).read_text())
    train_images = sum(1 for split in report["splits"].values() if split == "train")
    assert coverage["n"] == 2 and coverage["counts"] == [2 * train_images] * 4
    assert coverage["sampled"] == 2 * train_images * 4
    assert api.get(f"/{baseline['id']}/coverage") is None
    assert [e["kind"] for e in api.get(f"/{baseline['id']}/events")][-1] == "finished"
    exported = fast_settings.data_dir / "tasks" / str(patchgd["id"]) / "exports"
    assert any(exported.glob("*.safetensors"))
    # Downloads: safetensors at once; TorchScript made by the worker on the first request, then kept.
    weights = api.client.get(f"/api/v1/tasks/{patchgd['id']}/model", headers=api.auth)
    assert weights.status_code == 200 and weights.content == (exported / "model.safetensors").read_bytes()
    first = api.client.get(f"/api/v1/tasks/{patchgd['id']}/model?format=torchscript", headers=api.auth)
    assert first.status_code == 202 and first.json()["status"] == "exporting"

    def torchscript_ready() -> bool:
        response = api.client.get(f"/api/v1/tasks/{patchgd['id']}/model?format=torchscript", headers=api.auth)
        assert response.status_code in (200, 202), response.text
        return response.status_code == 200 and len(response.content) > 1000

    wait_until(processes, "the TorchScript export", torchscript_ready, timeout=120)

    # A long run, cancelled while it trains, ends `cancelled` within seconds.
    long = api.create("long", "patchgd", dict(TINY_PATCHGD, epochs=50, batch_size=2))
    wait_until(
        processes,
        "the long run's first steps",
        lambda: api.get(f"/{long['id']}")["progress"]["step"] >= 2,
        ended=lambda: status_of(api, long["id"]) in service.TERMINAL_NAMES,
    )
    asked = time.monotonic()
    assert api.post(f"/{long['id']}/cancel")["cancel_requested"] is True
    wait_until(processes, "the cancel", lambda: status_of(api, long["id"]) == "cancelled", timeout=30)
    assert time.monotonic() - asked < 30
    kinds = [e["kind"] for e in api.get(f"/{long['id']}/events")]
    assert kinds[0] == "claimed" and kinds[-2:] == ["cancel_seen", "finished"], kinds
    # Logged when asked; on a fast device (seen on a GPU) an epoch can end before the worker sees it.
    assert kinds.index("cancel_requested") < kinds.index("cancel_seen"), kinds
    assert api.get(f"/{long['id']}")["progress"]["fraction"] < 1.0  # stopped, not run to its end
    assert worker.poll() is None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA")
def test_on_cuda_a_budgeted_patchgd_task_records_its_peak_against_the_enforced_budget(
    fast_settings, processes, api
):
    """The GPU end to end: a real worker trains a PatchGD task on CUDA with the allocator capped at
    the task's budget (``enforce_budget``) and records the measured peak against it."""
    processes.start("worker")
    budget_gib = 2.0
    task = api.create("budgeted", "patchgd", dict(TINY_PATCHGD, epochs=2), memory_budget_gib=budget_gib)
    wait_until(
        processes,
        "the budgeted task",
        lambda: status_of(api, task["id"]) in service.TERMINAL_NAMES,
    )
    body = api.get(f"/{task['id']}")
    assert body["status"] == "succeeded", (body, processes.logs())
    memory = body["memory"]
    print("gpu task memory:", json.dumps(memory))  # kept in bench/gpu.sh's test log
    assert memory["device"] == "cuda" and memory["enforced"] is True, memory
    assert memory["budget_bytes"] == int(budget_gib * 2**30)
    assert 0 < memory["peak_bytes"] <= memory["budget_bytes"] and memory["within_budget"] is True, memory


def _checkpoint_step(settings: Settings, task_id: int) -> int | None:
    from worker.patchgd.checkpoint import load_checkpoint

    path = service.checkpoint_dir(settings, task_id) / "last.pt"
    return int(load_checkpoint(path)["step"]) if path.exists() else None


@pytest.mark.slow
def test_a_killed_worker_s_task_is_requeued_and_resumed_from_its_checkpoint(fast_settings, processes, api):
    processes.start("beat")
    worker = processes.start("worker")
    # 12 training images, batch 2: 6 steps an epoch; a checkpoint between steps every 0.6 s.
    hp = dict(TINY_PATCHGD, epochs=3, batch_size=2, checkpoint_every_minutes=0.01)
    task_id = api.create("crash", "patchgd", hp)["id"]
    last = service.checkpoint_dir(fast_settings, task_id) / "last.pt"
    seen = {"mtime": 0.0, "step": 0}

    def mid_epoch_checkpoint() -> bool:
        # Reads the checkpoint only when it changed (it is a few dozen MB).
        if not last.exists() or last.stat().st_mtime == seen["mtime"]:
            return False
        seen["mtime"] = last.stat().st_mtime
        seen["step"] = _checkpoint_step(fast_settings, task_id) or 0
        return seen["step"] % 6 != 0 and seen["step"] < 15

    wait_until(
        processes,
        "a mid-epoch checkpoint",
        mid_epoch_checkpoint,
        ended=lambda: status_of(api, task_id) in service.TERMINAL_NAMES,
    )
    processes.kill(worker)
    resumed_at = _checkpoint_step(fast_settings, task_id)
    assert resumed_at is not None and resumed_at >= seen["step"]
    assert status_of(api, task_id) == "running"  # until the lease expires and the reaper acts

    processes.start("worker")
    wait_until(processes, "the resumed run", lambda: status_of(api, task_id) in service.TERMINAL_NAMES)
    body = api.get(f"/{task_id}")
    assert body["status"] == "succeeded", (body, processes.logs())
    assert body["attempts"] == 2
    starts = body_attempts(fast_settings, task_id)
    assert [s["first_step"] for s in starts] == [1, resumed_at + 1]
    metrics = api.get(f"/{task_id}/metrics")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]  # each epoch once, none repeated by the resume
    events = api.get(f"/{task_id}/events")
    kinds = [e["kind"] for e in events]
    assert kinds.count("claimed") == 2 and "lease_lost" in kinds and kinds[-1] == "finished"
    resumed = next(e for e in events if e["kind"] == "resumed")
    assert resumed["attempt"] == 2 and resumed["data"]["step"] == resumed_at
    assert body["final_metrics"]["num_samples"] > 0


def body_attempts(settings: Settings, task_id: int) -> list[dict]:
    from backend.db import session_scope
    from backend.models import Task

    with session_scope(settings) as session:
        return list((session.get(Task, task_id).artifacts or {}).get("attempts", []))


@pytest.mark.slow
def test_a_task_whose_worker_dies_on_every_attempt_fails_with_a_reason(fast_settings, processes, api):
    fast_settings.task_max_attempts = 2
    processes.start("beat")
    task_id = api.create("doomed", "patchgd", dict(TINY_PATCHGD, epochs=50, batch_size=2))["id"]
    assert api.get(f"/{task_id}")["max_attempts"] == 2
    for attempt in (1, 2):
        worker = processes.start("worker")
        wait_until(
            processes,
            f"attempt {attempt} training",
            lambda a=attempt: (
                lambda b: b["attempts"] == a and b["status"] == "running" and b["progress"]["step"] >= 1
            )(api.get(f"/{task_id}")),
            ended=lambda: status_of(api, task_id) in service.TERMINAL_NAMES,
        )
        processes.kill(worker)
    processes.start("worker")  # runs the reaper's job
    wait_until(processes, "the reaper's verdict", lambda: status_of(api, task_id) == "failed")
    body = api.get(f"/{task_id}")
    assert body["attempts"] == 2 and "stopped responding" in body["error"]


@pytest.mark.slow
def test_the_worker_reads_training_images_from_the_task_s_pyramid_level(fast_settings, processes, api):
    """Every level of the dataset's TIFFs is a grey of its own (level L: 10 * (L + 1)); level 2 of
    a 256² pyramid is 64², the training size, so the images the run cached are level 2's pixels."""
    import numpy as np

    slides = ready_dataset(fast_settings, api.client, api.auth, name="slides", archive=pyramid_zip())
    response = api.client.post(
        "/api/v1/tasks",
        json={
            "name": "level 2",
            "dataset_id": slides,
            "backbone_id": api.backbone_id,
            "algorithm": "baseline",
            "hyperparameters": TINY_BASELINE,
            "pyramid_level": 2,
        },
        headers=api.auth,
    )
    assert response.status_code == 201, response.text
    task = response.json()
    processes.start("worker")
    wait_until(processes, "the level-2 run", lambda: status_of(api, task["id"]) in service.TERMINAL_NAMES)
    body = api.get(f"/{task['id']}")
    assert body["status"] == "succeeded", (body, processes.logs())
    assert body["pyramid_level"] == 2
    cached = sorted((service.task_dir(fast_settings, task["id"]) / "cache").rglob("*.npy"))
    report = json.loads((dataset_dir(fast_settings, slides) / REPORT_FILE).read_text())
    assert len(cached) == len(report["labels"]) == 6  # every image, train and held out
    for path in cached:
        pixels = np.load(path)
        assert pixels.shape == (64, 64, 3) and np.all(pixels == 30), path
