"""Upload → validating → ready (and → invalid) through a real Celery worker process started with
the command line `tessera serve` uses, so the light queue is proved to be consumed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.config import Settings
from backend.queue import DEFAULT_QUEUE, LIGHT_QUEUE, TRAINING_QUEUE
from backend.supervisor import worker_command
from tests.datasets.helpers import bad_zip, good_zip
from tests.processes import running

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Worker start-up (the SQL broker is polled once a second) plus two tiny validations.
TIMEOUT_SECONDS = 90.0


#: The Redis database of this module's own broker when the tests run on Redis.
OWN_REDIS_DB = 14


@pytest.fixture
def own_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with a broker of its own, emptied first: a worker started on the shared
    one would first work through what earlier tests left there (jobs whose ids name rows of other
    databases; a built-in measurement among them holds the worker for a minute)."""
    if settings.broker_url.startswith("redis"):
        import redis

        url = settings.broker_url.rsplit("/", 1)[0] + f"/{OWN_REDIS_DB}"
        redis.Redis.from_url(url).flushdb()
    else:
        url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return settings.model_copy(update={"broker_url": url})


@pytest.fixture
def serve_worker(own_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with running(worker_command(own_settings), own_settings, tmp_path / "worker.log") as process:
        yield process


def wait_for(client, headers, dataset_id: int, process, log: Path) -> dict:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    seen = set()
    while True:
        body = client.get(f"/api/v1/datasets/{dataset_id}", headers=headers).json()
        seen.add(body["status"])
        if body["status"] != "validating":
            body["seen"] = seen
            return body
        assert process.poll() is None, f"worker exited early:\n{log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, (
            f"still validating; worker log:\n{log.read_text(errors='replace')}"
        )
        time.sleep(0.3)


@pytest.mark.slow
def test_a_real_worker_validates_uploads_from_the_light_queue(
    own_settings, make_client, make_user, bearer, serve_worker, tmp_path
):
    assert "tessera.light" in " ".join(worker_command(own_settings))
    client = make_client(own_settings)
    auth = bearer(client, make_user())
    good = client.post(
        "/api/v1/datasets",
        data={"name": "pets"},
        files={"file": ("pets.zip", good_zip(), "application/zip")},
        headers=auth,
    ).json()
    bad = client.post(
        "/api/v1/datasets",
        data={"name": "broken"},
        files={"file": ("broken.zip", bad_zip(), "application/zip")},
        headers=auth,
    ).json()
    assert good["status"] == bad["status"] == "validating"

    log = tmp_path / "worker.log"
    ready = wait_for(client, auth, good["id"], serve_worker, log)
    assert ready["status"] == "ready", ready
    assert ready["summary"]["class_counts"] == {"cat": 3, "dog": 3}
    assert ready["progress"]["done"] == ready["progress"]["total"] > 0
    invalid = wait_for(client, auth, bad["id"], serve_worker, log)
    assert invalid["status"] == "invalid" and invalid["problems"]
    assert "datasets.validate" in log.read_text(errors="replace")


def test_every_worker_command_reads_the_light_and_training_queues():
    queues = f"{DEFAULT_QUEUE},{LIGHT_QUEUE},{TRAINING_QUEUE}"
    assert queues in worker_command(Settings(data_dir=REPO_ROOT / "unused"))
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f'"--queues", "{queues}"' in dockerfile
