"""A broker that accepts connections and never answers must not freeze the API.

The broker here is a real listening socket that accepts every connection and never replies,
the way a wedged Redis or a black-holing proxy behaves.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from backend.accounts import users as user_service
from backend.db import session_scope
from backend.models import User
from backend.queue import enqueue, enqueue_after_commit

# Far above the configured timeouts (1 s health, 1 s broker), far below "hangs".
ANSWER_WITHIN_SECONDS = 10.0


@pytest.fixture
def hanging_broker() -> Iterator[str]:
    """A redis:// URL whose server accepts TCP connections and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)  # kept open, never read from or written to

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(timeout=5)
    server.close()
    for connection in accepted:
        connection.close()


@pytest.fixture
def hung_settings(settings, hanging_broker):
    return settings.model_copy(update={"broker_url": hanging_broker, "broker_timeout_seconds": 1.0})


def test_healthz_answers_503_quickly(hung_settings, make_client):
    client = make_client(hung_settings)
    started = time.monotonic()
    response = client.get("/healthz")
    assert time.monotonic() - started < ANSWER_WITHIN_SECONDS
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "ok", "broker": "unreachable"}


def test_many_health_checks_do_not_starve_other_requests(
    hung_settings, make_client, make_user, bearer, portal
):
    client = make_client(hung_settings)
    headers = bearer(client, make_user())
    transport = httpx.ASGITransport(app=client.app)

    async def scenario() -> tuple[list[int], int, float]:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            health_codes: list[int] = []

            async def health() -> None:
                health_codes.append((await http.get("/healthz")).status_code)

            with anyio.fail_after(3 * ANSWER_WITHIN_SECONDS):
                async with anyio.create_task_group() as group:
                    for _ in range(40):
                        group.start_soon(health)
                    await anyio.sleep(0.2)  # the health checks are in flight now
                    started = time.monotonic()
                    with anyio.fail_after(ANSWER_WITHIN_SECONDS):
                        me = await http.get("/api/v1/users/me", headers=headers)
                    me_seconds = time.monotonic() - started
            return health_codes, me.status_code, me_seconds

    health_codes, me_status, me_seconds = portal.call(scenario)
    assert me_status == 200
    assert me_seconds < ANSWER_WITHIN_SECONDS
    assert health_codes == [503] * 40


def test_enqueue_reports_not_dispatched_within_a_bound(hung_settings):
    started = time.monotonic()
    result = enqueue(hung_settings, "tessera.test.nothing", 1)
    assert time.monotonic() - started < ANSWER_WITHIN_SECONDS
    assert not result.dispatched
    assert result.reason


def test_enqueue_after_commit_keeps_the_committed_row(hung_settings):
    with session_scope(hung_settings) as session:
        user = user_service.create_user(session, hung_settings, "queued-row", "correct-horse-battery")
        enqueue_after_commit(session, hung_settings, "tessera.test.nothing", user.id)
    # The commit succeeded and the failed dispatch did not raise: the row is there.
    with session_scope(hung_settings) as session:
        assert session.query(User).filter_by(username="queued-row").one()
