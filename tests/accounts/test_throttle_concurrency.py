"""Throttling holds under concurrency: a burst of guesses gets at most ``login_max_failures`` checks."""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import func, select

from backend.accounts.users import create_user
from backend.db import session_scope
from backend.models import LoginAttempt

BURST = 30
LIMIT = 10


def _burst(client, username: str, password: str, count: int) -> Counter[int]:
    """Send ``count`` sign-ins from as many threads at once; count the answers by status."""
    barrier = threading.Barrier(count)
    statuses: list[int] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        response = client.post("/api/v1/auth/token", data={"username": username, "password": password})
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=attempt) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Counter(statuses)


def test_concurrent_wrong_passwords_get_at_most_the_limit_of_checks(make_client, settings):
    # A real argon2 cost, so the password checks of the burst overlap as they do in production.
    costly = settings.model_copy(
        update={"login_max_failures": LIMIT, "argon2_time_cost": 2, "argon2_memory_cost_kib": 16 * 1024}
    )
    with session_scope(costly) as session:
        create_user(session, costly, "target", "the-right-password")
    client = make_client(costly)

    statuses = _burst(client, "target", "a-wrong-password", BURST)

    assert set(statuses) <= {401, 429}, statuses
    assert statuses[401] <= LIMIT, statuses
    assert statuses[429] == BURST - statuses[401], statuses
    # Refused attempts take their reservation back: the rows left are the checked ones. (A burst
    # may get fewer than LIMIT checks: an attempt counts the reservations of those still racing.)
    with session_scope(costly) as session:
        recorded = session.scalar(select(func.count()).select_from(LoginAttempt))
    assert recorded == statuses[401]
