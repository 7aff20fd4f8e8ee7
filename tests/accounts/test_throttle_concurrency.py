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


def test_a_burst_of_right_passwords_is_checked_in_turn_not_refused(make_client, settings):
    # The same burst with the right password: attempts beyond the limit wait for the ones being
    # checked, see them succeed, and go on; none is refused as if the others had failed.
    costly = settings.model_copy(
        update={"login_max_failures": LIMIT, "argon2_time_cost": 2, "argon2_memory_cost_kib": 16 * 1024}
    )
    with session_scope(costly) as session:
        create_user(session, costly, "owner", "the-right-password")
    client = make_client(costly)

    statuses = _burst(client, "owner", "the-right-password", BURST)

    assert statuses == Counter({200: BURST}), statuses
    with session_scope(costly) as session:
        rows = session.scalars(select(LoginAttempt)).all()
    assert len(rows) == BURST and all(row.success and not row.pending for row in rows)


def test_a_pending_attempt_whose_check_died_counts_as_a_settled_failure(settings):
    from datetime import timedelta

    from backend.accounts.login import PENDING_STALE_SECONDS, throttle_retry_after
    from backend.models import utcnow

    limited = settings.model_copy(update={"login_max_failures": 2})
    now = utcnow()
    with session_scope(limited) as session:
        for _ in range(2):  # two checks still running: a newcomer waits for them
            session.add(LoginAttempt(username="busy", success=False, pending=True, at=now, ip="10.0.0.1"))
        stale = now - timedelta(seconds=PENDING_STALE_SECONDS + 5)
        for _ in range(2):  # two checks whose processes died before settling them: plain failures
            session.add(LoginAttempt(username="dead", success=False, pending=True, at=stale, ip="10.0.0.1"))
    with session_scope(limited) as session:

        def settled(name):
            return throttle_retry_after(session, limited, name, now, ip="10.0.0.1", include_pending=False)

        assert throttle_retry_after(session, limited, "busy", now, ip="10.0.0.1") is not None
        assert settled("busy") is None
        assert settled("dead") is not None
