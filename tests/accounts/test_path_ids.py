"""Ids in paths are bounded: a huge id answers 404 or 422 on every route, never a database overflow."""

from __future__ import annotations

import pytest

from backend.deps import MAX_ROW_ID
from backend.models import Role

HUGE_IDS = ["99999999999999999999", str(2**63), str(MAX_ROW_ID + 1), "-1", "0"]
API_ROUTES = [
    ("GET", "/api/v1/users/{id}", None),
    ("PATCH", "/api/v1/users/{id}", {"is_active": False}),
    ("DELETE", "/api/v1/tokens/{id}", None),
]
PAGE_ROUTES = ["/settings/tokens/{id}/revoke", "/admin/users/{id}/deactivate", "/admin/users/{id}/reactivate"]


@pytest.mark.parametrize("row_id", HUGE_IDS)
def test_api_routes_bound_row_ids(client, make_user, bearer, row_id):
    auth = bearer(client, make_user("root", role=Role.ADMIN))
    for method, path, body in API_ROUTES:
        response = client.request(method, path.format(id=row_id), headers=auth, json=body)
        assert response.status_code == 422, (method, path, response.text)
        assert response.json()["error"] == "validation_error"


@pytest.mark.parametrize("row_id", HUGE_IDS)
def test_page_routes_bound_row_ids(client, make_user, login, row_id):
    csrf = login(client, make_user("root", role=Role.ADMIN))
    for path in PAGE_ROUTES:
        response = client.post(path.format(id=row_id), headers={"X-CSRF-Token": csrf})
        assert response.status_code == 422, (path, response.text)


def test_largest_storable_id_is_simply_not_found(client, make_user, bearer, login):
    admin = make_user("root", role=Role.ADMIN)
    auth = bearer(client, admin)
    for method, path, body in API_ROUTES:
        response = client.request(method, path.format(id=MAX_ROW_ID), headers=auth, json=body)
        assert response.status_code == 404, (method, path, response.text)
    csrf = login(client, admin)
    for path in PAGE_ROUTES:
        response = client.post(path.format(id=MAX_ROW_ID), headers={"X-CSRF-Token": csrf})
        assert response.status_code == 404, (path, response.text)


def test_session_ids_are_bounded(client, make_user, bearer, login):
    user = make_user()
    auth = bearer(client, user)
    csrf = login(client, user)
    long_id = "a" * 10_000
    assert client.delete(f"/api/v1/sessions/{long_id}", headers=auth).status_code == 422
    response = client.post(f"/settings/sessions/{long_id}/revoke", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 422
    # A well-formed id that matches nothing is still a plain 404.
    assert client.delete(f"/api/v1/sessions/{'f' * 64}", headers=auth).status_code == 404
