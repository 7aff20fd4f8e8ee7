"""Personal API tokens: shown once, stored hashed, usable, revocable, private to their owner."""

from __future__ import annotations

from sqlalchemy import select

from backend.db import session_scope
from backend.models import ApiToken, TokenKind
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
    assert [t["name"] for t in listing.json()] == ["training scripts"]
    assert "token" not in listing.json()[0]
    assert secret not in listing.text

    # It works as a bearer token, and records its use.
    token_auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/users/me", headers=token_auth).json()["username"] == "alice"
    assert client.get("/api/v1/tokens", headers=auth).json()[0]["last_used_at"] is not None

    revoked = client.delete(f"/api/v1/tokens/{body['id']}", headers=auth)
    assert revoked.status_code == 204
    assert client.get("/api/v1/users/me", headers=token_auth).status_code == 401
    assert client.get("/api/v1/tokens", headers=auth).json() == []


def test_another_users_token_cannot_be_revoked(client, make_user, bearer):
    owner_auth = bearer(client, make_user("owner"))
    intruder_auth = bearer(client, make_user("intruder"))
    token = client.post("/api/v1/tokens", json={"name": "mine"}, headers=owner_auth).json()

    attempt = client.delete(f"/api/v1/tokens/{token['id']}", headers=intruder_auth)
    assert attempt.status_code == 404
    assert attempt.json()["error"] == "not_found"
    assert client.get("/api/v1/tokens", headers=intruder_auth).json() == []
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
