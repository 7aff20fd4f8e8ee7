"""CSRF: cookie-authenticated unsafe requests need the session's token; bearer requests do not."""

from __future__ import annotations

from sqlalchemy import func, select

from backend.db import session_scope
from backend.models import ApiToken, Role, User


def _token_count(settings) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(ApiToken))


def test_cookie_request_without_csrf_is_rejected_and_changes_nothing(client, make_user, login, settings):
    login(client, make_user())
    response = client.post("/api/v1/tokens", json={"name": "sneaky"})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    wrong = client.post("/api/v1/tokens", json={"name": "sneaky"}, headers={"X-CSRF-Token": "wrong"})
    assert wrong.status_code == 403
    assert _token_count(settings) == 0


def test_cookie_request_with_csrf_header_is_accepted(client, make_user, login, settings):
    csrf = login(client, make_user())
    response = client.post("/api/v1/tokens", json={"name": "ok"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 201
    assert _token_count(settings) == 1


def test_csrf_token_of_another_session_is_rejected(make_client, make_user, login, settings):
    first, second = make_client(), make_client()
    user = make_user()
    login(first, user)
    other_csrf = login(second, user)
    response = first.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": other_csrf})
    assert response.status_code == 403
    assert _token_count(settings) == 0


def test_bearer_requests_are_exempt(client, make_user, bearer):
    auth = bearer(client, make_user())
    assert client.post("/api/v1/tokens", json={"name": "script"}, headers=auth).status_code == 201


def test_admin_deactivation_form_without_csrf_is_rejected(client, make_user, login, settings):
    login(client, make_user("root", role=Role.ADMIN))
    victim = make_user("victim")
    response = client.post(f"/admin/users/{victim.id}/deactivate", data={})
    assert response.status_code == 403
    with session_scope(settings) as session:
        assert session.get(User, victim.id).is_active is True


def test_admin_deactivation_form_with_csrf_works(client, make_user, login, settings):
    csrf = login(client, make_user("root", role=Role.ADMIN))
    victim = make_user("victim")
    response = client.post(f"/admin/users/{victim.id}/deactivate", data={"csrf_token": csrf})
    assert response.status_code == 303
    with session_scope(settings) as session:
        assert session.get(User, victim.id).is_active is False
