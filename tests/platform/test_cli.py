"""The ``tessera user`` commands against a real database."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from backend.cli import app
from backend.config import get_settings
from backend.db import session_scope
from backend.models import Role, User, UserSession
from backend.security import verify_password


@pytest.fixture
def cli_env(settings, monkeypatch):
    """Point the CLI's environment-based settings at the test database."""
    monkeypatch.setenv("TESSERA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TESSERA_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TESSERA_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("TESSERA_ARGON2_TIME_COST", str(settings.argon2_time_cost))
    monkeypatch.setenv("TESSERA_ARGON2_MEMORY_COST_KIB", str(settings.argon2_memory_cost_kib))
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_user_create_list_and_deactivate(cli_env):
    runner = CliRunner()
    created = runner.invoke(
        app, ["user", "create", "Alice", "--admin", "--password-stdin"], input="s3cret-pass\n"
    )
    assert created.exit_code == 0, created.output
    assert "Created admin 'alice'" in created.output
    with session_scope(cli_env) as session:
        user = session.scalar(select(User).where(User.username == "alice"))
        assert user is not None and user.role == Role.ADMIN and user.is_active
        assert verify_password(cli_env, "s3cret-pass", user.password_hash)

    duplicate = runner.invoke(app, ["user", "create", "alice", "--password-stdin"], input="another-pass\n")
    assert duplicate.exit_code == 1
    assert "already taken" in duplicate.output

    listing = runner.invoke(app, ["user", "list"])
    assert listing.exit_code == 0 and "alice" in listing.output and "admin" in listing.output

    deactivated = runner.invoke(app, ["user", "deactivate", "alice"])
    assert deactivated.exit_code == 0
    with session_scope(cli_env) as session:
        assert session.scalar(select(User.is_active).where(User.username == "alice")) is False


def test_user_create_rejects_a_short_password_and_non_interactive_prompt(cli_env):
    runner = CliRunner()
    short = runner.invoke(app, ["user", "create", "bob", "--password-stdin"], input="short\n")
    assert short.exit_code == 1 and "at least 8 characters" in short.output
    no_tty = runner.invoke(app, ["user", "create", "bob"])
    assert no_tty.exit_code == 1 and "--password-stdin" in no_tty.output
    with session_scope(cli_env) as session:
        assert session.scalar(select(User).where(User.username == "bob")) is None


def test_set_password_signs_the_user_out(cli_env, client, make_user, login, bearer):
    user = make_user("carol")
    access = bearer(client, user)
    personal = client.post("/api/v1/tokens", json={"name": "script"}, headers=access).json()["token"]
    login(client, user)
    result = CliRunner().invoke(
        app, ["user", "set-password", "carol", "--password-stdin"], input="brand-new-pass\n"
    )
    assert result.exit_code == 0, result.output
    assert client.get("/api/v1/users/me").status_code == 401
    with session_scope(cli_env) as session:
        assert all(s.revoked_at is not None for s in session.scalars(select(UserSession)))
    # Everywhere includes the API: access (tsa_) and personal (tsr_) tokens stop working.
    client.cookies.clear()
    assert client.get("/api/v1/users/me", headers=access).status_code == 401
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {personal}"}).status_code == 401
