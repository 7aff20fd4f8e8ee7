"""Migrations apply, revert and re-apply cleanly on every supported database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect

from backend.config import Settings
from backend.db import alembic_config, downgrade_database, get_engine, upgrade_database

ACCOUNT_TABLES = {"users", "user_sessions", "api_tokens", "login_attempts"}


def _tables(settings: Settings) -> set[str]:
    engine = get_engine(settings)
    engine.dispose()  # see the schema as it is now, not through a connection opened before the change
    return set(inspect(engine).get_table_names())


def test_upgrade_downgrade_upgrade(empty_database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_database_url)

    upgrade_database(settings)
    assert _tables(settings) >= ACCOUNT_TABLES
    # The models and the migrations describe the same schema.
    command.check(alembic_config(settings))

    downgrade_database(settings, "base")
    assert _tables(settings) & ACCOUNT_TABLES == set()

    upgrade_database(settings)
    assert _tables(settings) >= ACCOUNT_TABLES
