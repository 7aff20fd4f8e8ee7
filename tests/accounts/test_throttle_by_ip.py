"""Throttling per client IP next to per account: nobody can lock an owner out from elsewhere."""

from __future__ import annotations

from sqlalchemy import select

from backend.db import session_scope
from backend.models import LoginAttempt

ATTACKER_IP = "203.0.113.66"
OWNER_IP = "198.51.100.7"


def _token(client, username: str, password: str):
    return client.post("/api/v1/auth/token", data={"username": username, "password": password})


def test_failures_from_one_ip_do_not_lock_out_the_owner_elsewhere(make_client, make_user, settings):
    user = make_user("alice")
    attacker = make_client(client_ip=ATTACKER_IP)
    for _ in range(settings.login_max_failures):
        assert _token(attacker, "alice", "a-wrong-guess").status_code == 401
    # The attacker's IP is locked out of this account, even with the right password...
    refused = _token(attacker, "alice", user.password)
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= settings.login_window_seconds + 1

    # ...but the owner, from an address with no failures, signs in.
    owner = make_client(client_ip=OWNER_IP)
    assert _token(owner, "alice", user.password).status_code == 200
    with session_scope(settings) as session:
        ips = session.execute(select(LoginAttempt.ip, LoginAttempt.success)).all()
    assert (OWNER_IP, True) in ips and (ATTACKER_IP, True) not in ips


def test_a_locked_account_gives_each_new_ip_one_check_only(make_client, make_user, settings):
    user = make_user("bob")
    first = make_client(client_ip="203.0.113.1")
    for _ in range(settings.login_max_failures):
        _token(first, "bob", "a-wrong-guess")
    second = make_client(client_ip="203.0.113.2")
    assert _token(second, "bob", "another-wrong-guess").status_code == 401
    # Having failed against the locked account, the second address is locked out of it too.
    assert _token(second, "bob", user.password).status_code == 429


def test_page_sign_in_uses_the_same_per_ip_rules(make_client, make_user, settings, login):
    user = make_user("carol")
    attacker = make_client(client_ip=ATTACKER_IP)
    for _ in range(settings.login_max_failures):
        _token(attacker, "carol", "a-wrong-guess")
    login(make_client(client_ip=OWNER_IP), user)  # asserts the 303 of a successful sign-in


def test_one_ip_guessing_across_many_accounts_gets_429(make_client, make_user, settings):
    limit = 6
    spread = settings.model_copy(update={"login_ip_max_failures": limit})
    victim = make_user("victim")
    attacker = make_client(spread, client_ip=ATTACKER_IP)
    # One guess per account: no account reaches its own limit, the address reaches its limit.
    for index in range(limit):
        assert _token(attacker, f"someone{index}", "a-guess").status_code == 401
    blocked = _token(attacker, "victim", victim.password)
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= settings.login_window_seconds + 1
    # Other addresses are not affected.
    assert _token(make_client(spread, client_ip=OWNER_IP), "victim", victim.password).status_code == 200
