"""Browser sign-in and sign-out: sessions, cookies, CSRF on the form, throttling, messages."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from backend.accounts.login import INCORRECT_CREDENTIALS
from backend.db import session_scope
from backend.models import UserSession, utcnow
from backend.security import sha256_hex
from tests.conftest import login_form_token


def _post_login(client, username, password, token=None, **extra):
    data = {
        "username": username,
        "password": password,
        "csrf_token": token or login_form_token(client),
        **extra,
    }
    return client.post("/login", data=data)


def test_login_sets_a_hardened_session_cookie_and_logout_revokes_it(client, make_user, settings):
    user = make_user("alice")
    response = _post_login(client, "alice", user.password)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    set_cookie = next(
        v for v in response.headers.get_list("set-cookie") if v.startswith(settings.session_cookie_name)
    )
    assert "HttpOnly" in set_cookie
    assert "samesite=lax" in set_cookie.lower()
    cookie = client.cookies[settings.session_cookie_name]
    with session_scope(settings) as session:
        row = session.get(UserSession, sha256_hex(cookie))
        assert row is not None and row.revoked_at is None
        assert session.get(UserSession, cookie) is None  # the raw cookie value is never a key

    dashboard = client.get("/")
    assert dashboard.status_code == 200
    assert "<h1>Dashboard</h1>" in dashboard.text

    csrf = client.get("/settings").text.split('name="csrf_token" value="')[1].split('"')[0]
    logout = client.post("/logout", data={"csrf_token": csrf})
    assert logout.status_code == 303 and logout.headers["location"] == "/login"
    assert client.get("/").status_code == 303

    # Replaying the old cookie after logout does not work.
    client.cookies.set(settings.session_cookie_name, cookie)
    assert client.get("/").status_code == 303
    assert client.get("/api/v1/users/me").status_code == 401


def test_secure_flag_follows_settings(make_client, make_user, settings):
    client = make_client(settings.model_copy(update={"cookie_secure": True}), base_url="https://testserver")
    user = make_user()
    response = _post_login(client, user.username, user.password)
    set_cookie = next(
        v for v in response.headers.get_list("set-cookie") if v.startswith(settings.session_cookie_name)
    )
    assert "Secure" in set_cookie


def test_every_login_gets_a_new_session_id(client, make_user, settings):
    user = make_user("bob")
    token = login_form_token(client)
    _post_login(client, "bob", user.password, token=token)
    first = client.cookies[settings.session_cookie_name]
    # Signing in again while holding a session (or a planted cookie) retires the old id.
    _post_login(client, "bob", user.password, token=token)
    second = client.cookies[settings.session_cookie_name]
    assert first != second
    with session_scope(settings) as session:
        assert session.get(UserSession, sha256_hex(first)).revoked_at is not None
        assert session.get(UserSession, sha256_hex(second)).revoked_at is None


def test_login_form_requires_its_csrf_token(client, make_user, settings):
    user = make_user("carol")
    login_form_token(client)  # has the cookie, but sends no token
    missing = client.post("/login", data={"username": "carol", "password": user.password})
    assert missing.status_code == 403
    forged = client.post(
        "/login", data={"username": "carol", "password": user.password, "csrf_token": "f" * 64}
    )
    assert forged.status_code == 403
    assert "expired" in forged.text
    assert settings.session_cookie_name not in client.cookies
    with session_scope(settings) as session:
        assert session.scalars(select(UserSession)).all() == []


def test_login_token_from_another_browser_is_rejected(make_client, make_user):
    attacker, victim = make_client(), make_client()
    user = make_user()
    token = login_form_token(attacker)
    login_form_token(victim)
    assert _post_login(victim, user.username, user.password, token=token).status_code == 403


def test_wrong_password_and_unknown_user_look_the_same(client, make_user):
    make_user("dave")
    wrong = _post_login(client, "dave", "not-the-password")
    unknown = _post_login(client, "nobody", "not-the-password")
    assert wrong.status_code == unknown.status_code == 401
    assert INCORRECT_CREDENTIALS in wrong.text and INCORRECT_CREDENTIALS in unknown.text


def test_login_page_throttles_with_retry_after(client, make_user, settings):
    user = make_user("erin")
    for _ in range(settings.login_max_failures):
        assert _post_login(client, "erin", "wrong-password").status_code == 401
    blocked = _post_login(client, "erin", user.password)
    assert blocked.status_code == 429
    assert int(blocked.headers["Retry-After"]) > 0
    assert "Too many failed sign-in attempts" in blocked.text
    assert settings.session_cookie_name not in client.cookies


def test_next_parameter_only_allows_local_paths(client, make_user):
    user = make_user()
    token = login_form_token(client)
    for target, expected in [
        ("/settings", "/settings"),
        ("//evil.example", "/"),
        ("https://evil.example", "/"),
    ]:
        response = _post_login(client, user.username, user.password, token=token, next=target)
        assert response.headers["location"] == expected


def test_pages_redirect_anonymous_users_to_login(client):
    response = client.get("/settings")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/settings"
    htmx = client.get("/settings", headers={"HX-Request": "true"})
    assert htmx.headers["HX-Redirect"] == "/login?next=/settings"


def test_expired_session_is_rejected(client, make_user, settings):
    user = make_user()
    _post_login(client, user.username, user.password)
    assert client.get("/").status_code == 200
    with session_scope(settings) as session:
        session.execute(update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/").status_code == 303
