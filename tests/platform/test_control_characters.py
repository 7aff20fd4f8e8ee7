"""Names with a NUL or another control character are refused (or, for sign-in, simply fail) and
never stored: Postgres refuses NUL in text columns, which would otherwise answer 500."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from backend.db import session_scope
from backend.models import ApiToken, Dataset


def test_sign_in_with_a_nul_in_the_username_is_an_ordinary_failure(client, make_user):
    user = make_user()
    response = client.post(
        "/api/v1/auth/token", data={"username": user.username + "\x00", "password": user.password}
    )
    assert response.status_code == 401
    assert response.json()["detail"] == "Incorrect username or password."


@pytest.mark.parametrize("name", ["with\x00nul", "bell\x07ringer"])
def test_names_with_control_characters_are_refused_and_not_stored(client, make_user, bearer, settings, name):
    headers = bearer(client, make_user())

    token = client.post("/api/v1/tokens", json={"name": name}, headers=headers)
    dataset = client.post(
        "/api/v1/datasets",
        data={"name": name},
        files={"file": ("a.zip", b"PK\x05\x06" + b"\x00" * 18, "application/zip")},
        headers=headers,
    )

    assert token.status_code == 400, token.text
    assert "control characters" in token.json()["detail"]
    assert dataset.status_code in {400, 422}, dataset.text
    assert "control characters" in str(dataset.json()["detail"])
    with session_scope(settings) as session:
        assert session.scalars(select(ApiToken).where(ApiToken.name.contains("\x07"))).all() == []
        assert session.scalars(select(Dataset)).all() == []
