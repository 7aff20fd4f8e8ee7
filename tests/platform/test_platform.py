"""First admin, work sent only after commit, and JSON request logs."""

from __future__ import annotations

import json

from kombu import Connection
from sqlalchemy import select

from backend.accounts.users import ensure_first_admin
from backend.db import run_after_commit, session_scope
from backend.models import Role, User
from backend.queue import enqueue_after_commit
from backend.security import verify_password


def _first_admin(settings):
    with session_scope(settings) as session:
        return ensure_first_admin(session, settings)


def test_first_admin_is_created_once_with_a_generated_password(settings):
    password = _first_admin(settings)
    assert password is not None and len(password) >= 16
    with session_scope(settings) as session:
        admin = session.scalar(select(User))
        assert admin.username == settings.admin_username and admin.role == Role.ADMIN
        assert verify_password(settings, password, admin.password_hash)
    assert _first_admin(settings) is None  # users exist: nothing to do


def test_first_admin_with_a_configured_password_returns_none(settings):
    configured = settings.model_copy(update={"admin_username": "Boss", "admin_password": "configured-pass"})
    assert _first_admin(configured) is None
    with session_scope(settings) as session:
        admin = session.scalar(select(User))
        assert admin.username == "boss"
        assert verify_password(settings, "configured-pass", admin.password_hash)


def test_after_commit_callbacks_run_only_on_commit(settings):
    ran: list[str] = []
    with session_scope(settings) as session:
        run_after_commit(session, lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]

    try:
        with session_scope(settings) as session:
            run_after_commit(session, lambda: ran.append("rolled back"))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with session_scope(settings):
        pass  # a later commit must not run callbacks of the rolled-back transaction
    assert ran == ["committed"]


def test_enqueue_after_commit_puts_a_message_on_the_broker(settings, tmp_path):
    broker = f"sqla+sqlite:///{tmp_path / 'queue.db'}"
    local = settings.model_copy(update={"broker_url": broker})
    with session_scope(local) as session:
        enqueue_after_commit(session, local, "tessera.test.nothing", 42, "abc")
    with Connection(broker) as connection:
        queue = connection.SimpleQueue("celery")
        message = queue.get(timeout=5)
        assert message.headers["task"] == "tessera.test.nothing"
        args, kwargs, _embed = message.decode()
        assert args == [42, "abc"] and kwargs == {}
        message.ack()
        queue.close()


def test_json_request_log_lines(make_client, settings, capsys):
    client = make_client(settings.model_copy(update={"log_json": True}))
    client.get("/login", headers={"X-Request-ID": "req-42"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    record = next(line for line in lines if line.get("request_id") == "req-42")
    assert record["method"] == "GET" and record["path"] == "/login" and record["status"] == 200
    assert record["route"] == "/login" and record["duration_ms"] >= 0
