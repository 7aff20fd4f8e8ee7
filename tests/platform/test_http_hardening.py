"""HTTP hardening: no caching of secrets, request body limits, bounded 422s, keep-alive after a 500."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backend.config import Settings

HX = {"HX-Request": "true"}
MIB = 1024 * 1024
CHUNK = 64 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_PORT = 18231


def test_secrets_and_signed_in_pages_are_never_cached(client, make_user, login, bearer):
    user = make_user("alice")
    token = client.post("/api/v1/auth/token", data={"username": user.username, "password": user.password})
    assert token.status_code == 200
    assert token.headers["Cache-Control"] == "no-store"
    auth = bearer(client, user)
    created = client.post("/api/v1/tokens", json={"name": "ci"}, headers=auth)
    assert created.status_code == 201 and created.headers["Cache-Control"] == "no-store"
    assert client.get("/api/v1/users/me", headers=auth).headers["Cache-Control"] == "no-store"

    csrf = login(client, user)
    assert client.get("/settings").headers["Cache-Control"] == "no-store"
    panel = client.post("/settings/tokens", data={"name": "laptop"}, headers={**HX, "X-CSRF-Token": csrf})
    assert panel.status_code == 200 and "laptop" in panel.text
    assert panel.headers["Cache-Control"] == "no-store"
    assert client.get("/").headers["Cache-Control"] == "no-store"
    # Static files keep their caching (validators, no no-store).
    static = client.get("/static/css/app.css")
    assert static.status_code == 200
    assert "Cache-Control" not in static.headers and "etag" in static.headers


def _streamed_body(total: int, consumed: list[int]) -> AsyncIterator[bytes]:
    """An async body of ``total`` bytes sent without a length, counting what the server pulled."""

    async def generate() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            size = min(CHUNK, total - sent)
            consumed.append(size)
            sent += size
            yield b" " * size

    return generate()


@pytest.fixture
def small_limit_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_request_body_bytes": 2 * MIB})


def test_a_large_anonymous_body_is_refused_after_the_limit_not_read_and_parsed(
    make_client, small_limit_settings
):
    client = make_client(small_limit_settings)
    consumed: list[int] = []
    response = client.post(
        "/api/v1/tokens",
        content=_streamed_body(50 * MIB, consumed),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    # At most one chunk past the limit was pulled from a 50 MiB body.
    assert sum(consumed) <= 2 * MIB + CHUNK


def test_a_declared_length_over_the_limit_is_refused_before_reading(make_client, small_limit_settings):
    client = make_client(small_limit_settings)
    consumed: list[int] = []
    response = client.post(
        "/api/v1/tokens",
        content=_streamed_body(50 * MIB, consumed),
        headers={"Content-Type": "application/json", "Content-Length": str(50 * MIB)},
    )
    assert response.status_code == 413
    assert response.json() == {
        "error": "too_large",
        "detail": f"The request body is larger than the {2 * MIB} bytes accepted here.",
    }
    assert response.headers["Connection"] == "close"
    assert sum(consumed) == 0


def test_a_large_authenticated_json_body_is_413(client, make_user, bearer):
    auth = bearer(client, make_user())
    response = client.post("/api/v1/tokens", json={"name": "x" * (20 * MIB)}, headers=auth)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert len(response.content) < 1000


def test_a_large_form_body_is_413_on_pages_too(client, make_user, login):
    csrf = login(client, make_user())
    response = client.post(
        "/settings/tokens", data={"name": "x" * (3 * MIB)}, headers={**HX, "X-CSRF-Token": csrf}
    )
    assert response.status_code == 413


def test_validation_errors_do_not_echo_large_inputs(client, make_user, bearer):
    auth = bearer(client, make_user())
    big = "y" * 100_000
    response = client.post("/api/v1/tokens", json={"name": big}, headers=auth)
    assert response.status_code == 422
    assert len(response.content) < 2000
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "name"]
    assert error["input"].startswith("yyyy") and len(error["input"]) <= 201
    # A whole large body given where an object field was missing is left out, not repeated.
    response = client.post("/api/v1/tokens", json={"other": big}, headers=auth)
    assert response.status_code == 422 and len(response.content) < 2000
    # Small inputs are still shown as sent.
    response = client.post("/api/v1/tokens", json={"name": 12}, headers=auth)
    assert response.status_code == 422 and response.json()["detail"][0]["input"] == 12


@pytest.fixture
def unmigrated_server(tmp_path: Path) -> Iterator[int]:
    """``uvicorn`` serving Tessera on an empty (never migrated) SQLite database: every query 500s."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TESSERA_DATA_DIR": str(tmp_path / "data"),
        "TESSERA_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "TESSERA_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "TESSERA_SECRET_KEY": "test-secret-key",
        "TESSERA_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "backend.main:create_app"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(SERVER_PORT), "--log-level", "warning"],
        env=env,
        cwd=REPO_ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", SERVER_PORT, timeout=5)
                connection.request("GET", "/login")
                connection.getresponse().read()
                connection.close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        yield SERVER_PORT
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_500_leaves_the_keep_alive_connection_usable(unmigrated_server):
    connection = http.client.HTTPConnection("127.0.0.1", unmigrated_server, timeout=10)
    try:
        for _ in range(3):
            connection.request("GET", "/api/v1/users/me", headers={"Authorization": "Bearer abc"})
            failed = connection.getresponse()
            body = failed.read()
            assert failed.status == 500
            assert b"internal_error" in body and b"no such table" not in body
            # The next request on the same connection is answered (it used to get ECONNRESET).
            connection.request("GET", "/login")
            page = connection.getresponse()
            page.read()
            assert page.status == 200
    finally:
        connection.close()
