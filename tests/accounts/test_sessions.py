"""The API for one's own sessions and password."""

from __future__ import annotations

from backend.security import sha256_hex


def test_list_and_revoke_sessions(make_client, make_user, login, bearer, settings):
    laptop, phone = make_client(), make_client()
    user = make_user()
    csrf = login(laptop, user)
    login(phone, user)
    phone_id = sha256_hex(phone.cookies[settings.session_cookie_name])

    listed = laptop.get("/api/v1/sessions").json()
    assert len(listed) == 2
    assert [s["current"] for s in listed if s["id"] != phone_id] == [True]

    assert laptop.delete(f"/api/v1/sessions/{phone_id}").status_code == 403  # CSRF still applies
    assert laptop.delete(f"/api/v1/sessions/{phone_id}", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert phone.get("/api/v1/users/me").status_code == 401
    assert laptop.get("/api/v1/users/me").status_code == 200

    stranger = bearer(make_client(), make_user())
    own_id = next(s["id"] for s in listed if s["current"])
    assert laptop.delete(f"/api/v1/sessions/{own_id}", headers=stranger).status_code == 404


def test_change_password_through_the_api(client, make_user, bearer):
    user = make_user("pat")
    auth = bearer(client, user)
    wrong = client.put(
        "/api/v1/users/me/password",
        json={"current_password": "not-it-at-all", "new_password": "a-brand-new-one"},
        headers=auth,
    )
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "invalid", "detail": "The current password is not correct."}

    changed = client.put(
        "/api/v1/users/me/password",
        json={"current_password": user.password, "new_password": "a-brand-new-one"},
        headers=auth,
    )
    assert changed.status_code == 204
    old = client.post("/api/v1/auth/token", data={"username": "pat", "password": user.password})
    assert old.status_code == 401
    new = client.post("/api/v1/auth/token", data={"username": "pat", "password": "a-brand-new-one"})
    assert new.status_code == 200
