"""Alembic environment for Tessera.

The URL comes from ``config.attributes["database_url"]`` (set by ``backend.db.upgrade_database``)
or, when run as plain ``alembic``, from Tessera's Settings; never from alembic.ini, so there is
exactly one place where connection strings are configured.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from backend.config import Settings
from backend.db import create_db_engine
from backend.models import Base

config = context.config
target_metadata = Base.metadata

# Only the plain `alembic` command configures logging from alembic.ini; when Tessera runs the
# migrations itself, its own logging setup stays untouched.
if config.config_file_name is not None and "database_url" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    return Settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of executing it (``alembic upgrade --sql``)."""
    url = _database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a live connection; SQLite gets batch mode for ALTER support."""
    url = _database_url()
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
