"""The HTML shell: navigation, pages, settings (tokens, sessions, password) and the admin page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.db import session_scope
from backend.models import ApiToken, Role, User, UserSession
from backend.security import sha256_hex
from tests.conftest import TestUser

FRONTEND = Path(__file__).resolve().parents[2] / "frontend"
HX = {"HX-Request": "true"}


def _csrf_header(csrf: str) -> dict[str, str]:
    return {**HX, "X-CSRF-Token": csrf}


def test_dashboard_shows_navigation_and_getting_started(client, make_user, login):
    login(client, make_user("alice"))
    page = client.get("/")
    assert page.status_code == 200
    assert "<h1>Dashboard</h1>" in page.text
    for label in ("Dashboard", "Tasks", "Datasets", "Backbones", "Compare", "Settings"):
        assert f">{label}</a>" in page.text
    assert 'href="/admin/users"' not in page.text  # members see no Admin entry
    for step in ("Upload a dataset", "Pick a backbone", "Create a task", "Watch it train"):
        assert step in page.text
    # HTMX requests carry the CSRF token from <body>.
    assert re.search(r"<body hx-headers='\{\"X-CSRF-Token\": \"[^\"]+\"\}'>", page.text)


@pytest.mark.parametrize(
    "path,heading",
    [
        ("/tasks", "No training tasks yet"),
        ("/datasets", "No datasets yet"),
        ("/backbones", "No uploads yet"),
        ("/compare", "Nothing to compare yet"),
    ],
)
def test_section_pages_have_honest_empty_states(client, make_user, login, path, heading):
    login(client, make_user())
    page = client.get(path)
    assert page.status_code == 200
    assert heading in page.text
    assert 'aria-current="page"' in page.text


def test_admin_page_is_hidden_from_members(make_client, make_user, login):
    member, admin = make_client(), make_client()
    login(member, make_user("member"))
    login(admin, make_user("root", role=Role.ADMIN))
    assert member.get("/admin/users").status_code == 404
    page = admin.get("/admin/users")
    assert page.status_code == 200
    assert "member" in page.text and 'href="/admin/users"' in page.text


def test_admin_creates_and_deactivates_users_from_the_page(make_client, make_user, login, settings):
    admin, victim = make_client(), make_client()
    csrf = login(admin, make_user("root", role=Role.ADMIN))

    created = admin.post(
        "/admin/users",
        data={"username": "newbie", "password": "long-enough-pw", "role": "member"},
        headers=_csrf_header(csrf),
    )
    assert created.status_code == 200
    assert "Account “newbie” created." in created.text
    assert 'id="users-panel"' in created.text and "<html" not in created.text

    duplicate = admin.post(
        "/admin/users",
        data={"username": "NEWBIE", "password": "long-enough-pw", "role": "member"},
        headers=_csrf_header(csrf),
    )
    assert duplicate.status_code == 409
    assert "already taken" in duplicate.text

    with session_scope(settings) as session:
        newbie_id = session.scalar(select(User.id).where(User.username == "newbie"))
    login(victim, TestUser(id=newbie_id, username="newbie", password="long-enough-pw", role=Role.MEMBER))
    assert victim.get("/").status_code == 200

    deactivated = admin.post(f"/admin/users/{newbie_id}/deactivate", headers=_csrf_header(csrf))
    assert deactivated.status_code == 200
    assert "deactivated" in deactivated.text
    assert victim.get("/").status_code == 303


def test_token_is_shown_once_then_only_its_prefix(client, make_user, login, settings):
    csrf = login(client, make_user())
    created = client.post(
        "/settings/tokens", data={"name": "<script>alert(1)</script>"}, headers=_csrf_header(csrf)
    )
    assert created.status_code == 200
    assert "<html" not in created.text  # an HTMX fragment
    secret = re.search(r'value="(tsr_[^"]+)"', created.text).group(1)
    assert "data-copy=" in created.text
    assert "&lt;script&gt;" in created.text and "<script>alert" not in created.text

    with session_scope(settings) as session:
        row = session.scalar(select(ApiToken))
        assert row.token_hash == sha256_hex(secret)

    page = client.get("/settings")
    assert secret not in page.text
    assert row.prefix in page.text

    revoked = client.post(f"/settings/tokens/{row.id}/revoke", headers=_csrf_header(csrf))
    assert revoked.status_code == 200
    assert "No API tokens yet." in revoked.text
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_token_form_without_csrf_is_refused(client, make_user, login, settings):
    login(client, make_user())
    refused = client.post("/settings/tokens", data={"name": "x"}, headers=HX)
    assert refused.status_code == 403
    assert 'class="toast toast-error"' in refused.text
    with session_scope(settings) as session:
        assert session.scalars(select(ApiToken)).all() == []


def test_sessions_can_be_listed_and_revoked(make_client, make_user, login, settings):
    laptop, phone = make_client(), make_client()
    user = make_user()
    csrf = login(laptop, user)
    login(phone, user)
    phone_id = sha256_hex(phone.cookies[settings.session_cookie_name])

    page = laptop.get("/settings")
    assert page.text.count("/settings/sessions/") == 4  # two sessions, each with action and hx-post
    assert "this browser" in page.text

    response = laptop.post(f"/settings/sessions/{phone_id}/revoke", headers=_csrf_header(csrf))
    assert response.status_code == 200
    assert phone.get("/").status_code == 303
    assert laptop.get("/").status_code == 200


def test_someone_elses_session_cannot_be_revoked(make_client, make_user, login, settings):
    mine, theirs = make_client(), make_client()
    csrf = login(mine, make_user())
    login(theirs, make_user())
    their_id = sha256_hex(theirs.cookies[settings.session_cookie_name])
    response = mine.post(f"/settings/sessions/{their_id}/revoke", data={"csrf_token": csrf})
    assert response.status_code == 404
    with session_scope(settings) as session:
        assert session.get(UserSession, their_id).revoked_at is None


def test_change_password_signs_out_other_browsers(make_client, make_user, login):
    here, elsewhere = make_client(), make_client()
    user = make_user()
    csrf = login(here, user)
    login(elsewhere, user)

    mismatch = here.post(
        "/settings/password",
        data={
            "csrf_token": csrf,
            "current_password": user.password,
            "new_password": "a-new-password",
            "confirm_password": "different-one",
        },
    )
    assert mismatch.status_code == 400 and "do not match" in mismatch.text
    wrong = here.post(
        "/settings/password",
        data={
            "csrf_token": csrf,
            "current_password": "nope-nope",
            "new_password": "a-new-password",
            "confirm_password": "a-new-password",
        },
    )
    assert wrong.status_code == 400 and "current password is not correct" in wrong.text

    changed = here.post(
        "/settings/password",
        data={
            "csrf_token": csrf,
            "current_password": user.password,
            "new_password": "a-new-password",
            "confirm_password": "a-new-password",
        },
    )
    assert changed.status_code == 303
    assert "Password changed." in here.get("/settings").text  # flash message, shown once
    assert "Password changed." not in here.get("/settings").text
    assert elsewhere.get("/").status_code == 303


def test_no_cdn_links_and_htmx_is_vendored(client):
    for template in FRONTEND.joinpath("templates").rglob("*.html"):
        text = template.read_text()
        assert not re.search(r'(src|href)="(https?:)?//', text), template
    htmx = client.get("/static/vendor/htmx/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:200]
    assert (FRONTEND / "static/vendor/htmx/LICENSE").exists()
    assert client.get("/static/css/app.css").status_code == 200


def test_404_page_keeps_the_signed_in_layout(client, make_user, login):
    login(client, make_user("alice"))
    page = client.get("/no/such/page")
    assert page.status_code == 404
    assert "Page not found" in page.text
    assert ">alice</span>" in page.text and 'href="/settings"' in page.text
