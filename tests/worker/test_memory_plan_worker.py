"""A measured memory plan computed by a real prefork Celery worker (the production pool).

Prefork pool processes are daemonic, and `multiprocessing` forbids daemonic processes to have
children; the planner's measured trial must still run there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.config import Settings
from backend.queue import MEMORY_PLAN as PLAN_TASK
from backend.queue import enqueue
from tests.processes import celery_worker_command, running
from worker.patchgd.config import PatchGDConfig
from worker.tasks.training import plan_report_path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Worker start-up, two calibration runs and one measured trial, each in a fresh interpreter.
PLAN_TIMEOUT_SECONDS = 600.0
BUDGET_GIB = 1.0


@pytest.fixture(params=["sqlite-broker", "redis-broker"])
def worker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for one broker: kombu's SQLite transport, or Redis when ``TEST_REDIS_URL`` is set."""
    if request.param == "sqlite-broker":
        return Settings(data_dir=tmp_path, database_url="", broker_url="")
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("TEST_REDIS_URL is not set (CI sets it; e.g. redis://127.0.0.1:6379/0)")
    return Settings(
        data_dir=tmp_path, database_url=os.environ.get("TEST_DATABASE_URL", ""), broker_url=redis_url
    )


@pytest.fixture
def prefork_worker(worker_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`celery worker --pool prefork --concurrency 1`, as `tessera serve` and the Dockerfile run it."""
    command = celery_worker_command("--pool", "prefork", "--concurrency", "1", name="test-plan")
    with running(command, worker_settings, tmp_path / "worker.log") as process:
        yield process


@pytest.mark.slow
def test_prefork_worker_computes_a_measured_plan(
    worker_settings: Settings, prefork_worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    report_path = plan_report_path(worker_settings.data_dir, token)
    cfg = PatchGDConfig(
        num_classes=2,
        backbone="resnet18",
        image_size=256,
        patch_size=64,
        patches_per_step=4,
        batch_size=1,
        precision="fp32",
        channels_last=False,
    )

    # Measured (verify defaults to true in the job): the choice is confirmed by a trial.
    enqueue(worker_settings, PLAN_TASK, token, {"patchgd": cfg.to_dict()}, BUDGET_GIB, False)

    deadline = time.monotonic() + PLAN_TIMEOUT_SECONDS
    while not report_path.exists():
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert prefork_worker.poll() is None, f"worker exited early:\n{log}"
        assert "daemonic processes are not allowed" not in log, log
        assert time.monotonic() < deadline, f"no plan in {PLAN_TIMEOUT_SECONDS} s; worker log:\n{log}"
        time.sleep(0.5)

    report = json.loads(report_path.read_text())
    assert report["token"] == token and report["algorithm"] == "patchgd"
    assert set(report["algorithms"]) == {"patchgd"} and report["verified"] is True
    # The prefork pool ran the task in a child of the worker's main process.
    assert report["pid"] != prefork_worker.pid
    assert report["fits"], report["reason"]
    assert report["batch_size"] == 1 and 1 <= report["patches_per_step"] <= 4
    assert report["predicted_bytes"] > 0
    # Measured by a trial that really ran (inside the daemonic pool process), under the budget.
    assert 0 < report["measured_bytes"] <= BUDGET_GIB * (1 << 30)
    trial = report["plan"]["trials"][-1]
    assert trial["status"] == "ok" and trial["baseline_bytes"] > 0
    assert (worker_settings.data_dir / "memory_calibration.json").is_file()


@pytest.mark.parametrize("token", ["", "../escape", "a/b", "x" * 65])
def test_plan_rejects_tokens_that_are_not_plain_names(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValueError, match="Invalid plan token"):
        plan_report_path(tmp_path, token)
