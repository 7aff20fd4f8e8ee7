"""Account administration, admin-only visibility, and deactivation revoking everything."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from backend.db import session_scope
from backend.models import ApiToken, Role, User, UserSession


def test_admin_lists_creates_and_deactivates(client, make_user, bearer):
    admin = make_user("root", role=Role.ADMIN)
    auth = bearer(client, admin)

    created = client.post(
        "/api/v1/users", json={"username": "New.User", "password": "long-enough-pw"}, headers=auth
    )
    assert created.status_code == 201
    new = created.json()
    assert new["username"] == "new.user"
    assert new["role"] == "member" and new["is_active"] is True

    duplicate = client.post(
        "/api/v1/users", json={"username": "NEW.user", "password": "long-enough-pw"}, headers=auth
    )
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == "conflict"

    names = [u["username"] for u in client.get("/api/v1/users", headers=auth).json()]
    assert names == ["root", "new.user"]

    deactivated = client.patch(f"/api/v1/users/{new['id']}", json={"is_active": False}, headers=auth)
    assert deactivated.status_code == 200 and deactivated.json()["is_active"] is False
    reactivated = client.patch(f"/api/v1/users/{new['id']}", json={"is_active": True}, headers=auth)
    assert reactivated.json()["is_active"] is True


def test_admin_cannot_deactivate_themselves(client, make_user, bearer):
    admin = make_user("root", role=Role.ADMIN)
    auth = bearer(client, admin)
    response = client.patch(f"/api/v1/users/{admin.id}", json={"is_active": False}, headers=auth)
    assert response.status_code == 400
    assert client.get("/api/v1/users/me", headers=auth).status_code == 200


def test_short_password_is_a_readable_422(client, make_user, bearer):
    auth = bearer(client, make_user("root", role=Role.ADMIN))
    response = client.post("/api/v1/users", json={"username": "x1", "password": "short"}, headers=auth)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


def test_members_get_404_on_admin_endpoints(client, make_user, bearer):
    admin = make_user("root", role=Role.ADMIN)
    auth = bearer(client, make_user("member"))
    for method, path, kwargs in [
        ("GET", "/api/v1/users", {}),
        ("GET", f"/api/v1/users/{admin.id}", {}),
        ("POST", "/api/v1/users", {"json": {"username": "evil", "password": "long-enough-pw"}}),
        ("PATCH", f"/api/v1/users/{admin.id}", {"json": {"is_active": False}}),
    ]:
        response = client.request(method, path, headers=auth, **kwargs)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"] == "not_found"


def test_deactivation_revokes_sessions_and_tokens_at_once(make_client, make_user, login, bearer, settings):
    admin_client, victim_client = make_client(), make_client()
    admin_auth = bearer(admin_client, make_user("root", role=Role.ADMIN))
    victim = make_user("victim")

    login(victim_client, victim)
    access = bearer(victim_client, victim)
    personal = admin_client.post("/api/v1/tokens", json={"name": "v"}, headers=access).json()["token"]
    personal_auth = {"Authorization": f"Bearer {personal}"}
    assert victim_client.get("/").status_code == 200
    assert victim_client.get("/api/v1/users/me", headers=personal_auth).status_code == 200

    response = admin_client.patch(f"/api/v1/users/{victim.id}", json={"is_active": False}, headers=admin_auth)
    assert response.status_code == 200

    assert victim_client.get("/api/v1/users/me").status_code == 401  # session cookie
    assert victim_client.get("/").status_code == 303  # back to the login page
    assert victim_client.get("/api/v1/users/me", headers=access).status_code == 401
    assert victim_client.get("/api/v1/users/me", headers=personal_auth).status_code == 401
    with session_scope(settings) as session:
        assert all(s.revoked_at is not None for s in session.scalars(select(UserSession)))
        tokens = session.scalars(select(ApiToken).where(ApiToken.user_id == victim.id)).all()
        assert tokens and all(t.revoked_at is not None for t in tokens)

    # Reactivation does not bring old credentials back.
    admin_client.patch(f"/api/v1/users/{victim.id}", json={"is_active": True}, headers=admin_auth)
    assert victim_client.get("/api/v1/users/me", headers=personal_auth).status_code == 401


def test_concurrent_creation_of_the_same_username_is_a_conflict(settings, monkeypatch):
    from backend.accounts import users as user_service
    from backend.errors import Conflict

    with session_scope(settings) as session:
        user_service.create_user(session, settings, "racer", "long-enough-pw")
    # The other request already passed its existence check when this one committed: only the
    # unique index can stop the second insert.
    monkeypatch.setattr(user_service, "get_by_username", lambda session, username: None)
    with pytest.raises(Conflict, match="already taken"), session_scope(settings) as session:
        user_service.create_user(session, settings, "racer", "long-enough-pw")
    with session_scope(settings) as session:
        assert session.scalars(select(User).where(User.username == "racer")).all() != []


def _whoami(client, token: str) -> int:
    return client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).status_code


def test_password_change_revokes_access_tokens_and_keeps_personal_ones(make_client, make_user, bearer):
    """Ordinary change: password-flow tokens and other sessions go, named personal tokens stay."""
    api, other = make_client(), make_client()
    user = make_user()
    caller = bearer(api, user)
    other_access = bearer(other, user)["Authorization"].removeprefix("Bearer ")
    personal = api.post("/api/v1/tokens", json={"name": "script"}, headers=caller).json()["token"]

    changed = api.put(
        "/api/v1/users/me/password",
        json={"current_password": user.password, "new_password": "a-brand-new-password"},
        headers=caller,
    )
    assert changed.status_code == 204, changed.text
    assert _whoami(other, other_access) == 401
    assert _whoami(api, personal) == 200
    # The access token that made the change keeps working, like the browser session that does.
    assert api.get("/api/v1/users/me", headers=caller).status_code == 200


def test_settings_page_password_change_revokes_access_tokens(make_client, make_user, login, bearer):
    browser, script = make_client(), make_client()
    user = make_user()
    csrf = login(browser, user)
    access = bearer(script, user)["Authorization"].removeprefix("Bearer ")
    personal = script.post(
        "/api/v1/tokens", json={"name": "script"}, headers={"Authorization": f"Bearer {access}"}
    ).json()["token"]
    page = browser.get("/settings").text
    assert "Personal API tokens" in page and "keep working" in page

    changed = browser.post(
        "/settings/password",
        data={
            "csrf_token": csrf,
            "current_password": user.password,
            "new_password": "a-new-password",
            "confirm_password": "a-new-password",
        },
    )
    assert changed.status_code == 303
    assert _whoami(script, access) == 401
    assert _whoami(script, personal) == 200
    assert browser.get("/api/v1/users/me").status_code == 200
