"""Demo data: `tessera demo-data` registers an UltraMNIST-style dataset, the `datasets.demo` job
builds it (real MNIST digits) and it validates like any upload; `serve` registers a small one."""

from __future__ import annotations

import tarfile

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from backend.cli import app
from backend.config import get_settings
from backend.datasets import service
from backend.db import session_scope
from backend.models import Dataset, DatasetStatus, Role
from worker.tasks.datasets import build_demo, validate_dataset


@pytest.fixture
def cli_env(settings, monkeypatch):
    monkeypatch.setenv("TESSERA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TESSERA_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TESSERA_BROKER_URL", settings.broker_url)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def the_dataset(settings) -> Dataset:
    with session_scope(settings) as session:
        return session.scalars(select(Dataset)).one()


def test_demo_data_cli_builds_and_validates_for_the_first_admin(cli_env, make_user):
    make_user("member")
    admin = make_user("root", role=Role.ADMIN)
    result = CliRunner().invoke(app, ["demo-data", "--canvas-size", "128", "--count", "48", "--seed", "3"])
    assert result.exit_code == 0, result.output
    dataset = the_dataset(cli_env)
    assert dataset.owner_id == admin.id and dataset.source == "demo"
    assert dataset.status == DatasetStatus.UPLOADING

    assert build_demo(cli_env, dataset.id) == "validating"
    upload = service.upload_path(cli_env, dataset.id)
    with tarfile.open(upload) as archive:
        names = archive.getnames()
    assert "labels.csv" in names and "digits.json" not in names
    assert sum(name.endswith(".png") for name in names) == 48
    assert validate_dataset(cli_env, dataset.id) == "ready"
    ready = the_dataset(cli_env)
    assert ready.num_images == 48 and ready.summary["split_source"] == "explicit"
    assert sum(ready.summary["split_counts"]["val"].values()) == 8


def test_demo_data_for_an_unknown_user_fails(cli_env):
    result = CliRunner().invoke(app, ["demo-data", "--user", "nobody"])
    assert result.exit_code == 1 and "No account named 'nobody'" in result.output


def test_serve_registers_the_small_demo_once_and_it_validates(settings, make_user):
    user = make_user()
    with session_scope(settings) as session:
        assert service.ensure_serve_demo(session, settings) is not None
    with session_scope(settings) as session:
        assert service.ensure_serve_demo(session, settings) is None  # a dataset exists now
    dataset = the_dataset(settings)
    assert dataset.owner_id == user.id
    build_demo(settings, dataset.id)
    assert validate_dataset(settings, dataset.id) == "ready"
    ready = the_dataset(settings)
    assert ready.num_images == service.SERVE_DEMO["count"] and ready.num_classes >= 2
