"""About 100 requests at once, on the real database: every one answers, none fails.

Before admission control, 100 in-flight requests each held a pooled connection while waiting
for a thread (and threads waited for connections), so they timed out with 500s after 30 s; on
SQLite the first-use writes of tokens queued behind the single writer. This asserts only that
nothing fails, never how fast.
"""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import httpx
from sqlalchemy import select

from backend.accounts import tokens as token_service
from backend.db import get_engine, session_scope
from backend.models import ApiToken, User, utcnow

LOGINS = 30
READS = 70
FRESH_TOKENS = 20


def test_a_hundred_concurrent_requests_all_succeed(settings, make_client, make_user, portal):
    client = make_client()
    user = make_user()
    with session_scope(settings) as session:
        owner = session.get(User, user.id)
        # Never used yet: the first use of each writes its last-used time.
        tokens = [
            token_service.issue_access_token(session, settings, owner).plaintext for _ in range(FRESH_TOKENS)
        ]
    transport = httpx.ASGITransport(app=client.app)

    async def scenario() -> list[tuple[str, int]]:
        results: list[tuple[str, int]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:

            async def login() -> None:
                response = await http.post(
                    "/api/v1/auth/token", data={"username": user.username, "password": user.password}
                )
                results.append(("login", response.status_code))

            async def read(token: str) -> None:
                response = await http.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
                results.append(("me", response.status_code))

            with anyio.fail_after(240):
                async with anyio.create_task_group() as group:
                    for index in range(LOGINS + READS):
                        if index % 10 < 3:
                            group.start_soon(login)
                        else:
                            group.start_soon(read, tokens[index % FRESH_TOKENS])
        return results

    results = portal.call(scenario)
    assert len(results) == LOGINS + READS
    failures = [result for result in results if result[1] != 200]
    assert failures == [], f"{len(failures)} of {len(results)} failed: {sorted(set(failures))}"


def _issue_token(settings, user_id: int) -> tuple[int, str]:
    with session_scope(settings) as session:
        issued = token_service.issue_access_token(session, settings, session.get(User, user_id))
        return issued.row.id, issued.plaintext


def test_last_used_is_written_again_after_the_interval(settings, make_user):
    token_id, plaintext = _issue_token(settings, make_user().id)
    long_ago = utcnow() - token_service.LAST_USED_RESOLUTION - timedelta(seconds=5)
    with session_scope(settings) as session:
        session.get(ApiToken, token_id).last_used_at = long_ago
    with session_scope(settings) as session:
        assert token_service.resolve_token(session, plaintext) is not None
    with session_scope(settings) as session:
        assert session.get(ApiToken, token_id).last_used_at > long_ago + timedelta(seconds=4)


def test_a_read_does_not_wait_for_a_writer_holding_the_lock(settings, make_user):
    """While another transaction holds the write lock (SQLite) or the row (Postgres), a token still
    authenticates at once: its last-used time is simply not written this time."""
    token_id, plaintext = _issue_token(settings, make_user().id)
    engine = get_engine(settings)
    with engine.connect() as writer:
        if settings.is_sqlite:
            writer.exec_driver_sql("BEGIN IMMEDIATE")  # the database's single write lock
        else:
            writer.execute(select(ApiToken).where(ApiToken.id == token_id).with_for_update())
        started = time.monotonic()
        with session_scope(settings) as session:
            assert token_service.resolve_token(session, plaintext) is not None
        waited = time.monotonic() - started
        writer.rollback()
    # Without the skip, this waits for the 15 s busy timeout (SQLite) or forever (Postgres).
    assert waited < 5.0
    with session_scope(settings) as session:
        assert session.get(ApiToken, token_id).last_used_at is None


def test_a_started_web_process_freezes_its_heap_out_of_full_collections(settings):
    """With ``web_gc_freeze`` (the default), start-up leaves the objects alive then out of the
    cyclic collector's full passes, which otherwise stall every request while they walk them."""
    import gc

    from backend.main import create_app

    async def frozen_after_start(app_settings) -> int:  # noqa: ANN001
        app = create_app(app_settings)
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        frozen = anyio.run(frozen_after_start, settings.model_copy(update={"web_gc_freeze": True}))
    finally:
        gc.unfreeze()
    # The application's routes, schemas and modules: far more than a handful of objects.
    assert frozen > 10_000
    assert anyio.run(frozen_after_start, settings) == 0  # the tests' settings switch it off


def test_the_request_session_still_commits_what_an_endpoint_writes(settings, client, make_user, bearer):
    """A request whose session holds nothing after authentication closes it on the event loop;
    one whose endpoint wrote commits it (in a thread) before the response."""
    user = make_user()
    headers = bearer(client, user)
    assert client.get("/api/v1/users/me", headers=headers).status_code == 200
    created = client.post("/api/v1/tokens", json={"name": "after the change"}, headers=headers)
    assert created.status_code == 201, created.text
    with session_scope(settings) as session:
        names = session.scalars(select(ApiToken.name).where(ApiToken.user_id == user.id)).all()
    assert "after the change" in names
