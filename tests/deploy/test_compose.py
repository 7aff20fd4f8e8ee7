"""The production files, checked without a Docker engine: compose structure and image stages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# A value that compose fills from the environment and refuses to start without: ${NAME:?message}.
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def dockerfile_stages() -> dict[str, tuple[str | None, list[str]]]:
    """Stage name -> (parent stage if built FROM another stage, instructions), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    stages: dict[str, tuple[str | None, list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            base, name = match.groups()
            current = []
            stages[name] = (base if base in stages else None, current)
        current.append(line)
    return stages


def stage_instructions(stages: dict[str, tuple[str | None, list[str]]], name: str) -> list[str]:
    """Every instruction that goes into the image of stage ``name``, ancestors first."""
    parent, own = stages[name]
    return (stage_instructions(stages, parent) if parent else []) + own


def test_services_and_their_images(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["build"]["target"] == "api"
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    assert services["migrate"]["command"] == ["tessera", "migrate"]
    assert "8000:8000" in services["api"]["ports"]
    assert "healthcheck" in services["postgres"]
    assert "healthcheck" in services["redis"]


def test_one_beat_sends_the_periodic_tasks_from_the_api_image(compose: dict) -> None:
    beat = compose["services"]["beat"]
    assert beat["build"]["target"] == "api"  # no torch needed to send tasks by name
    assert beat["command"][:4] == ["celery", "-A", "worker.celery_app", "beat"]
    assert "/data/celerybeat-schedule" in beat["command"]
    assert "tessera-data:/data" in beat["volumes"]
    assert beat["environment"] == compose["services"]["worker"]["environment"]
    assert beat["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "deploy" not in beat  # exactly one: two beats would send every task twice


def test_migrations_run_once_before_api_and_workers(compose: dict) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_api_and_workers_share_one_data_volume_and_the_same_connections(compose: dict) -> None:
    services = compose["services"]
    mounts = {name: set(services[name]["volumes"]) for name in ("api", "worker")}
    assert "tessera-data:/data" in mounts["api"] & mounts["worker"]
    assert "tessera-data" in compose["volumes"]
    api_env, worker_env = services["api"]["environment"], services["worker"]["environment"]
    assert api_env == worker_env
    assert api_env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in api_env["DATABASE_URL"]
    assert api_env["BROKER_URL"].startswith("redis://redis:6379/")
    assert api_env["TESSERA_DATA_DIR"] == "/data"


def test_each_worker_reserves_one_gpu(compose: dict) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["api"]


def test_no_secret_is_written_in_the_compose_file(compose: dict) -> None:
    checked = 0
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), f"{name}.{key} is a literal: {value!r}"
                checked += 1
            userinfo = re.match(r"[a-z+]+://[^:/@]+:([^@]*)@", value)
            if userinfo:
                password = userinfo.group(1)
                assert REQUIRED_VARIABLE.fullmatch(password), f"{name}.{key} embeds a literal password"
                checked += 1
    assert checked >= 3  # the Postgres password, the secret key, the password inside DATABASE_URL


def test_api_image_has_no_torch_and_worker_image_has_it() -> None:
    stages = dockerfile_stages()
    assert set(stages) >= {"api", "worker"}
    api = " ".join(stage_instructions(stages, "api"))
    worker = " ".join(stage_instructions(stages, "worker"))
    assert api.split()[1].startswith("python:3.11")
    for forbidden in ("torch", "[worker]", ".[worker", "worker,"):
        assert forbidden not in api, f"the api stage must not install {forbidden!r}"
    assert "pip install -e '.[worker]'" in worker
    assert "--concurrency 1" in re.sub(r'"\s*,\s*"', " ", worker)


def test_both_images_run_as_an_unprivileged_user_with_a_data_volume() -> None:
    stages = dockerfile_stages()
    for name in ("api", "worker"):
        instructions = stage_instructions(stages, name)
        users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name} image runs as root"
        assert any(line.startswith("VOLUME") and "/data" in line for line in instructions)
