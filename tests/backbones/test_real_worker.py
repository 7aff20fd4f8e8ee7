"""A real Celery worker validates an upload sent through the API, and measures a built-in backbone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio.from_thread
import pytest
import torch

from backend.config import Settings
from backend.db import dispose_engines, session_scope, upgrade_database
from backend.main import create_app
from backend.models import Backbone, BackboneStatus
from backend.queue import BACKBONES_MEASURE, enqueue
from tests.conftest import FAST_HASHING, SyncClient
from tests.processes import celery_worker_command, running

#: Worker start-up, then a validation and a measurement (two calibration runs) on a busy CPU.
DEADLINE_SECONDS = 240.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Settings]:
    """A migrated SQLite database, kombu's SQLite broker, and a worker on both queues."""
    settings = Settings(data_dir=tmp_path / "data", database_url="", broker_url="", **FAST_HASHING)
    upgrade_database(settings)
    try:
        with running(celery_worker_command("--pool", "solo"), settings, tmp_path / "worker.log"):
            yield settings
    finally:
        dispose_engines()


def wait_for(settings: Settings, backbone_id: int, done: str, log: Path) -> Backbone:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        with session_scope(settings) as session:
            row = session.get(Backbone, backbone_id)
            assert row is not None
            if done == "validated" and row.status != BackboneStatus.VALIDATING:
                return row
            if done == "measured" and ({"memory", "measure_error"} & set(row.details)):
                return row
        assert time.monotonic() < deadline, (
            f"not {done} in time; worker log:\n{log.read_text(errors='replace')}"
        )
        time.sleep(0.5)


@pytest.mark.slow
def test_worker_validates_an_upload_and_measures_a_builtin(stack: Settings, tmp_path: Path) -> None:
    from backend.accounts import users

    with session_scope(stack) as session:
        users.create_user(session, stack, "worker-test", "correct-horse-battery")
    path = tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    import torchvision.models as tvm

    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with anyio.from_thread.start_blocking_portal() as portal:
        client = SyncClient(create_app(stack), portal)
        token = client.post(
            "/api/v1/auth/token", data={"username": "worker-test", "password": "correct-horse-battery"}
        ).json()["access_token"]
        with path.open("rb") as handle:
            created = client.post(
                "/api/v1/backbones",
                headers={"Authorization": f"Bearer {token}"},
                data={"name": "r18", "architecture": "resnet18"},
                files={"file": ("resnet18.pt", handle)},
            )
        client.close()
    assert created.status_code == 201, created.text

    row = wait_for(stack, created.json()["id"], "validated", tmp_path / "worker.log")
    assert row.status == BackboneStatus.READY, row.error
    assert row.details["dropped_head"]["classes"] == 1000

    with session_scope(stack) as session:
        builtin = Backbone(
            owner_id=None,
            name="resnet18",
            architecture="resnet18",
            builtin_key="resnet18",
            source="builtin",
            status=BackboneStatus.READY,
            details={},
            problems=[],
        )
        session.add(builtin)
        session.flush()
        builtin_id = builtin.id
    enqueue(stack, BACKBONES_MEASURE, builtin_id)
    measured = wait_for(stack, builtin_id, "measured", tmp_path / "worker.log")
    assert "memory" in measured.details, measured.details
    memory = measured.details["memory"]
    assert memory["activation_bytes_per_pixel"] > 0
    # What PatchGD is for: each extra megapixel costs the baseline its activations, PatchGD not.
    assert memory["baseline_bytes_per_megapixel"] > memory["patchgd_bytes_per_megapixel"]
    assert measured.param_count > 10_000_000
    assert measured.details["weights"] in ("random", "imagenet")
    assert measured.details["imagenet"]["filename"].startswith("resnet18-")
