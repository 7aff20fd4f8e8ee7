"""OAuth2 password flow, bearer authentication, login failures and throttling."""

from __future__ import annotations

import statistics
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from backend.accounts.login import INCORRECT_CREDENTIALS, authenticate
from backend.accounts.users import create_user
from backend.db import session_scope
from backend.errors import Unauthorized
from backend.models import USERNAME_MAX_LENGTH, ApiToken, LoginAttempt, TokenKind, utcnow
from tests.conftest import login_form_token


def test_password_flow_token_reads_me(client, make_user, settings):
    user = make_user("alice")
    response = client.post("/api/v1/auth/token", data={"username": "alice", "password": user.password})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == settings.access_token_max_age_seconds
    assert body["access_token"].startswith("tsa_")

    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["username"] == "alice"
    assert me.json()["role"] == "member"
    assert "password_hash" not in me.json()


def test_me_without_credentials_is_401_json(client):
    response = client.get("/api/v1/users/me")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_garbage_bearer_is_401_even_with_valid_cookie(client, make_user, login):
    login(client, make_user())
    response = client.get("/api/v1/users/me", headers={"Authorization": "Bearer tsr_not-a-real-token"})
    assert response.status_code == 401


def test_expired_access_token_is_rejected(client, make_user, bearer, settings):
    header = bearer(client, make_user())
    assert client.get("/api/v1/users/me", headers=header).status_code == 200
    with session_scope(settings) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.kind == TokenKind.ACCESS)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert client.get("/api/v1/users/me", headers=header).status_code == 401


def test_unknown_user_and_wrong_password_fail_identically(client, make_user):
    make_user("bob")
    wrong = client.post("/api/v1/auth/token", data={"username": "bob", "password": "not-the-password"})
    unknown = client.post("/api/v1/auth/token", data={"username": "nobody", "password": "not-the-password"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"error": "unauthorized", "detail": INCORRECT_CREDENTIALS}


def test_deactivated_user_cannot_get_a_token(client, make_user):
    user = make_user("carol", active=False)
    response = client.post("/api/v1/auth/token", data={"username": "carol", "password": user.password})
    assert response.status_code == 401
    assert response.json()["detail"] == INCORRECT_CREDENTIALS


def test_throttling_blocks_even_the_right_password(client, make_user, settings):
    user = make_user("dave")
    for _ in range(settings.login_max_failures):
        failed = client.post("/api/v1/auth/token", data={"username": "dave", "password": "wrong-password"})
        assert failed.status_code == 401

    blocked = client.post("/api/v1/auth/token", data={"username": "dave", "password": user.password})
    assert blocked.status_code == 429
    assert blocked.json()["error"] == "too_many_requests"
    retry_after = int(blocked.headers["Retry-After"])
    assert 0 < retry_after <= settings.login_window_seconds + 1

    # Other accounts are not affected.
    other = make_user("erin")
    ok = client.post("/api/v1/auth/token", data={"username": "erin", "password": other.password})
    assert ok.status_code == 200


def test_throttle_lifts_when_failures_leave_the_window(client, make_user, settings):
    user = make_user("frank")
    for _ in range(settings.login_max_failures):
        client.post("/api/v1/auth/token", data={"username": "frank", "password": "wrong-password"})
    assert (
        client.post("/api/v1/auth/token", data={"username": "frank", "password": user.password}).status_code
        == 429
    )

    # Age the recorded failures past the window, as if the time had passed.
    with session_scope(settings) as session:
        session.execute(
            update(LoginAttempt).values(at=utcnow() - timedelta(seconds=settings.login_window_seconds + 5))
        )
    assert (
        client.post("/api/v1/auth/token", data={"username": "frank", "password": user.password}).status_code
        == 200
    )


def test_failed_attempts_are_recorded_despite_the_error_response(client, make_user, settings):
    make_user("gina")
    client.post("/api/v1/auth/token", data={"username": "gina", "password": "wrong-password"})
    client.post("/api/v1/auth/token", data={"username": "ghost", "password": "wrong-password"})
    with session_scope(settings) as session:
        rows = session.execute(select(LoginAttempt.username, LoginAttempt.success)).all()
    assert sorted(rows) == [("ghost", False), ("gina", False)]


def test_unknown_user_costs_as_much_as_a_wrong_password(settings):
    """Without the dummy hash check, an unknown username would answer many times faster."""
    costly = settings.model_copy(
        update={"argon2_time_cost": 2, "argon2_memory_cost_kib": 16 * 1024, "login_max_failures": 1000}
    )
    with session_scope(costly) as session:
        create_user(session, costly, "timed", "the-right-password")

    def median_seconds(username: str) -> float:
        durations = []
        for _ in range(5):
            with session_scope(costly) as session:
                started = time.perf_counter()
                with pytest.raises(Unauthorized):
                    authenticate(session, costly, username, "a-wrong-password")
                durations.append(time.perf_counter() - started)
        return statistics.median(durations)

    authenticate_unknown = median_seconds("nobody-here")
    authenticate_wrong = median_seconds("timed")
    assert authenticate_unknown > 0.5 * authenticate_wrong


def test_over_long_username_is_a_failed_login_not_a_truncated_one(client, make_user, settings):
    user = make_user("a" * USERNAME_MAX_LENGTH)
    too_long = user.username + "-suffix"
    response = client.post("/api/v1/auth/token", data={"username": too_long, "password": user.password})
    assert response.status_code == 401
    assert response.json()["detail"] == INCORRECT_CREDENTIALS
    token = login_form_token(client)
    page = client.post("/login", data={"username": too_long, "password": user.password, "csrf_token": token})
    assert page.status_code == 401
    assert INCORRECT_CREDENTIALS in page.text
    assert settings.session_cookie_name not in client.cookies


def test_over_long_usernames_do_not_throttle_the_account_they_start_with(make_client, make_user, settings):
    user = make_user("b" * USERNAME_MAX_LENGTH)
    attacker = make_client()
    for _ in range(settings.login_max_failures + 2):
        attacker.post(
            "/api/v1/auth/token", data={"username": user.username + "x", "password": "wrong-password"}
        )
    owner = make_client()
    response = owner.post("/api/v1/auth/token", data={"username": user.username, "password": user.password})
    assert response.status_code == 200, response.text
