"""Built-in rows: created once even by racing first requests; measured by the job, ImageNet from the cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from sqlalchemy import func, select

from backend.backbones import service
from backend.config import Settings, get_settings
from backend.db import session_scope
from backend.models import Backbone, utcnow
from backend.queue import BACKBONES_MEASURE, LIGHT_QUEUE
from worker.patchgd.catalog import list_backbones
from worker.tasks import backbones as jobs


def count_builtins(settings: Settings) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).where(Backbone.builtin_key.is_not(None))) or 0


def test_racing_first_requests_create_each_builtin_once(settings: Settings) -> None:
    errors: list[BaseException] = []

    def second_request() -> None:
        try:
            with session_scope(settings) as session:
                service.ensure_builtins(session, settings)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    with session_scope(settings) as first:
        service.ensure_builtins(first, settings)  # inserted, not committed yet
        racer = threading.Thread(target=second_request)
        racer.start()
        time.sleep(0.5)  # the second one saw no rows and is now waiting on the first's insert
    racer.join(timeout=30)

    assert not errors, errors
    assert count_builtins(settings) == len(list_backbones())


@pytest.mark.slow
def test_measure_fills_memory_and_uses_imagenet_weights_from_the_torch_cache(
    job_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for torchvision's ImageNet file, under the name torchvision gives it, in a torch cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    filename = tvm.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    torch.save(tvm.resnet18(weights=None).state_dict(), checkpoints / filename)
    with session_scope(job_settings) as session:
        service.ensure_builtins(session, job_settings)
        builtin_id = service.builtin_for(session, "resnet18").id  # type: ignore[union-attr]

    assert jobs.measure(builtin_id) == "measured"

    with session_scope(job_settings) as session:
        row = session.get(Backbone, builtin_id)
        assert row is not None
        assert row.details["weights"] == "imagenet"
        assert (job_settings.data_dir / row.weights_path).is_file()
        memory = row.details["memory"]
        assert memory["baseline_bytes_per_megapixel"] > memory["patchgd_bytes_per_megapixel"]
        assert row.param_count == sum(
            p.numel() for n, p in tvm.resnet18().named_parameters() if "fc" not in n
        )
        # Uploads of an architecture show its built-in's figures.
        assert service.memory_of(session, row) == memory

    # Without the file (the calibration is cached in this process): random initialisation.
    (checkpoints / filename).unlink()
    jobs.measure(builtin_id)
    with session_scope(job_settings) as session:
        row = session.get(Backbone, builtin_id)
        assert row is not None
        assert row.details["weights"] == "random" and row.weights_path == ""
        assert row.details["imagenet"]["present"] is False


def test_measurements_are_requested_once_then_again_only_when_due(settings: Settings) -> None:
    with session_scope(settings) as session:
        service.ensure_builtins(session, settings)
        row = service.builtin_for(session, "resnet18")
        assert row is not None and "measure_requested_at" in row.details
        first = row.details["measure_requested_at"]
    with session_scope(settings) as session:
        service.ensure_builtins(session, settings)  # a job is on its way: not requested again
        row = service.builtin_for(session, "resnet18")
        assert row is not None and row.details["measure_requested_at"] == first
        # Measured, with ImageNet weights: nothing more to do, however long ago it was requested.
        long_ago = (utcnow() - service.MEASURE_RETRY_AFTER * 2).isoformat()
        row.details = {"memory": {"x": 1}, "weights": "imagenet", "measure_requested_at": long_ago}
        other = service.builtin_for(session, "resnet34")
        assert other is not None
        other.details = {"memory": {"x": 1}, "weights": "random", "measure_requested_at": long_ago}
        failed = service.builtin_for(session, "resnet50")
        assert failed is not None
        failed.details = {
            "measure_error": "RuntimeError: calibration failed",
            "measure_requested_at": long_ago,
        }
    with session_scope(settings) as session:
        service.ensure_builtins(session, settings)
        row, other = service.builtin_for(session, "resnet18"), service.builtin_for(session, "resnet34")
        assert row is not None and other is not None
        assert row.details["measure_requested_at"] == long_ago
        # Without ImageNet weights it is looked at again (a file may have been copied into the cache).
        assert other.details["measure_requested_at"] != long_ago
        # A failed measurement is tried again.
        failed = service.builtin_for(session, "resnet50")
        assert failed is not None and failed.details["measure_requested_at"] != long_ago


def _light_queue_jobs(settings: Settings) -> list[tuple[str, list]]:
    """(task name, args) of every message waiting on the light queue of ``settings``'s broker."""
    from kombu import Connection

    jobs_sent = []
    with Connection(settings.broker_url) as connection:
        queue = connection.SimpleQueue(LIGHT_QUEUE)
        try:
            while True:
                try:
                    message = queue.get(block=True, timeout=1)
                except queue.Empty:
                    break
                jobs_sent.append((message.headers["task"], message.payload[0]))
                message.ack()
        finally:
            queue.close()
    return jobs_sent


def test_the_builtins_are_measured_one_at_a_time_by_a_chained_job(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first start's measurements hold one light-queue slot, so a user's plan never waits behind
    all of them: one job is sent for every due built-in, and each job hands the rest on."""
    own = settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"})
    with session_scope(own) as session:
        service.ensure_builtins(session, own)
        ids = sorted(session.scalars(select(Backbone.id).where(Backbone.builtin_key.is_not(None))))
    assert len(ids) == len(list_backbones()) > 2
    assert _light_queue_jobs(own) == [(BACKBONES_MEASURE, [ids[0], ids[1:]])]

    monkeypatch.setenv("TESSERA_DATA_DIR", str(own.data_dir))
    monkeypatch.setenv("TESSERA_DATABASE_URL", own.database_url)
    monkeypatch.setenv("TESSERA_BROKER_URL", own.broker_url)
    get_settings.cache_clear()
    try:
        # A row that is gone is skipped, and the chain still goes on.
        assert jobs.measure(max(ids) + 1000, ids[1:]) == "skipped"
    finally:
        get_settings.cache_clear()
    assert _light_queue_jobs(own) == [(BACKBONES_MEASURE, [ids[1], ids[2:]])]
