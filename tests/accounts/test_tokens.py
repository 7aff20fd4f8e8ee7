"""API tokens: shown once, stored hashed, usable, listed and revocable (both kinds), private to the owner."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from backend.db import session_scope
from backend.models import ApiToken, TokenKind, utcnow
from backend.security import sha256_hex


def test_token_lifecycle(client, make_user, bearer, settings):
    user = make_user("alice")
    auth = bearer(client, user)

    created = client.post("/api/v1/tokens", json={"name": "training scripts"}, headers=auth)
    assert created.status_code == 201
    body = created.json()
    secret = body["token"]
    assert secret.startswith("tsr_")
    assert body["prefix"] == secret[: len(body["prefix"])]
    assert len(body["prefix"]) < len(secret) // 3

    # Stored only as a hash: no column of the row contains the secret.
    with session_scope(settings) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.kind == TokenKind.PERSONAL))
        assert row is not None
        assert row.token_hash == sha256_hex(secret)
        assert all(secret not in str(value) for value in vars(row).values())

    # Shown once: lists carry the prefix, never the secret.
    listing = client.get("/api/v1/tokens", headers=auth)
    assert listing.status_code == 200
    assert [(t["name"], t["kind"]) for t in listing.json()] == [
        ("training scripts", "personal"),
        ("password flow", "access"),
    ]
    assert "token" not in listing.json()[0]
    assert secret not in listing.text

    # It works as a bearer token, and records its use.
    token_auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/users/me", headers=token_auth).json()["username"] == "alice"
    assert client.get("/api/v1/tokens", headers=auth).json()[0]["last_used_at"] is not None

    revoked = client.delete(f"/api/v1/tokens/{body['id']}", headers=auth)
    assert revoked.status_code == 204
    assert client.get("/api/v1/users/me", headers=token_auth).status_code == 401
    assert [t["kind"] for t in client.get("/api/v1/tokens", headers=auth).json()] == ["access"]


def test_another_users_token_cannot_be_revoked(client, make_user, bearer):
    owner_auth = bearer(client, make_user("owner"))
    intruder_auth = bearer(client, make_user("intruder"))
    token = client.post("/api/v1/tokens", json={"name": "mine"}, headers=owner_auth).json()

    attempt = client.delete(f"/api/v1/tokens/{token['id']}", headers=intruder_auth)
    assert attempt.status_code == 404
    assert attempt.json()["error"] == "not_found"
    assert [t["kind"] for t in client.get("/api/v1/tokens", headers=intruder_auth).json()] == ["access"]
    # Still valid for its owner.
    assert (
        client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token['token']}"}).status_code
        == 200
    )


def test_blank_token_name_is_rejected_in_the_error_shape(client, make_user, bearer):
    auth = bearer(client, make_user())
    response = client.post("/api/v1/tokens", json={"name": "   "}, headers=auth)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid"
    missing = client.post("/api/v1/tokens", json={}, headers=auth)
    assert missing.status_code == 422
    assert missing.json()["error"] == "validation_error"
    assert missing.json()["detail"][0]["loc"] == ["body", "name"]


def test_password_flow_tokens_are_listed_and_revocable(make_client, make_user, bearer, login):
    script, browser = make_client(), make_client()
    user = make_user()
    access = bearer(script, user)
    secret = access["Authorization"].removeprefix("Bearer ")

    listed = script.get("/api/v1/tokens", headers=access).json()
    assert len(listed) == 1
    assert listed[0]["kind"] == "access" and secret.startswith(listed[0]["prefix"])
    assert listed[0]["expires_at"] is not None
    login(browser, user)
    page = browser.get("/settings").text
    assert listed[0]["prefix"] in page and '<td class="token-kind">access</td>' in page

    # The owner revokes it from another client, and it stops working at once.
    other = bearer(browser, user)
    assert browser.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=other).status_code == 204
    assert script.get("/api/v1/users/me", headers=access).status_code == 401
    assert listed[0]["id"] not in [t["id"] for t in browser.get("/api/v1/tokens", headers=other).json()]


def test_expired_access_tokens_are_not_listed(client, make_user, bearer, settings):
    access = bearer(client, make_user())
    personal = client.post("/api/v1/tokens", json={"name": "script"}, headers=access).json()["token"]
    with session_scope(settings) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.kind == TokenKind.ACCESS)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    listed = client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {personal}"}).json()
    assert [t["kind"] for t in listed] == ["personal"]
