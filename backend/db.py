"""Database engine, sessions and schema migrations.

The request owns the transaction: services only ``flush()``; :func:`backend.deps.get_session` commits when the
request handler returns and rolls back when it raises. Work queued with
:func:`backend.queue.enqueue_after_commit` runs only once that commit has succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from threading import Lock
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Executable, create_engine, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from backend.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"

# SQLite waits this long for a competing writer (API, worker, beat) before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 15_000
AFTER_ROLLBACK_KEY = "tessera_after_rollback"
AFTER_COMMIT_KEY = "after_commit_callbacks"
#: Connections beyond the pool size, for the requests that bypass the admission line.
POOL_SPARE_CONNECTIONS = 8

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_lock = Lock()


def pool_arguments(pool_size: int | None) -> dict[str, Any]:
    """Pool sizing for ``pool_size`` concurrent users (SQLAlchemy's default, 5 + 10, when None).

    The web process passes its admission limit (:mod:`backend.limits`): every admitted request
    can hold a connection and the paths that bypass the line have spare ones, so no request ever
    waits for the pool while holding a thread another request needs.
    """
    if pool_size is None:
        return {}
    return {"pool_size": pool_size, "max_overflow": POOL_SPARE_CONNECTIONS}


def create_db_engine(url: str, pool_size: int | None = None) -> Engine:
    """Build an engine for ``url`` with the connection settings Tessera relies on.

    SQLite gets WAL journaling (readers never block the writer), enforced foreign keys and a busy
    timeout, set on every new connection; Postgres gets ``pool_pre_ping`` so connections dropped by
    a database restart are replaced instead of failing a request.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        pooling = pool_arguments(pool_size) if database and database != ":memory:" else {}
        engine = create_engine(url, connect_args={"check_same_thread": False}, **pooling)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool_arguments(pool_size))


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for ``settings.database_url`` (one per URL, created on first use)."""
    url = settings.database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_db_engine(url, pool_size=settings.web_concurrency)
            _engines[url] = engine
            _factories[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return engine


def get_sessionmaker(settings: Settings) -> sessionmaker[Session]:
    """The session factory bound to :func:`get_engine` for these settings."""
    get_engine(settings)
    return _factories[settings.database_url]


def dispose_engines() -> None:
    """Close every cached engine's connections (used at shutdown and between test databases)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def run_after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's current transaction has committed (dropped on rollback)."""
    session.info.setdefault(AFTER_COMMIT_KEY, []).append(callback)


def run_after_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` if the session's current transaction rolls back (dropped on commit): the
    undo of work done outside the database, such as files created for a row that never existed."""
    session.info.setdefault(AFTER_ROLLBACK_KEY, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit_callbacks(session: Session) -> None:
    session.info.pop(AFTER_ROLLBACK_KEY, None)
    callbacks = session.info.pop(AFTER_COMMIT_KEY, [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_after_commit_callbacks(session: Session) -> None:
    # Work queued for a transaction that never committed must never be sent.
    session.info.pop(AFTER_COMMIT_KEY, None)
    for callback in session.info.pop(AFTER_ROLLBACK_KEY, []):
        callback()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises (CLI, workers, requests)."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def touch_quietly(session: Session, statement: Executable) -> bool:
    """Run one bookkeeping write (a last-used time) in its own short transaction, or skip it.

    Reads must never wait on writes: the session's current transaction is committed first (which
    also returns its connection to the pool), and the write gives up at once when another writer
    holds the lock. On SQLite the lock wait is switched off for this statement; on Postgres the
    statement must pick its row with ``FOR UPDATE SKIP LOCKED`` (it then changes nothing). Returns
    True when the statement ran and committed.
    """
    session.commit()
    # A connection of its own, outside the ORM session: a rollback here must not expire the
    # objects the request already loaded. The session holds none right now.
    with session.get_bind().connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        try:
            if sqlite:
                connection.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                connection.execute(statement)
            finally:
                if sqlite:
                    connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            connection.commit()
            return True
        except OperationalError:  # "database is locked": someone else writes; a later request touches
            connection.rollback()
            return False


def touch_column(session: Session, row: Any, column: Any, now: datetime, stale: Any) -> None:
    """Set ``column`` of ``row`` to ``now`` while ``stale`` still holds, via :func:`touch_quietly`.

    The row is picked with ``FOR UPDATE SKIP LOCKED`` (Postgres), so a request that finds it being
    written changes nothing; the loaded object shows the new value only when the write committed.
    """
    model = type(row)
    target = (
        select(model.id).where(model.id == row.id, stale).with_for_update(skip_locked=True)
    ).scalar_subquery()
    statement = update(model).where(model.id == target).values({column.key: now})
    if touch_quietly(session, statement.execution_options(synchronize_session=False)):
        set_committed_value(row, column.key, now)


def end_transaction(session: Session) -> None:
    """Commit what the session did so far and give its connection back to the pool.

    Used after authentication: the endpoint runs in another thread-pool hop, and a connection
    must not be held while waiting for a thread (see :mod:`backend.limits`).
    """
    session.commit()


def alembic_config(settings: Settings) -> Config:
    """Alembic configuration pointing at this repository's migrations and ``settings``' database."""
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # migrations/env.py reads these attributes; the URL never comes from alembic.ini.
    config.attributes["database_url"] = settings.database_url
    config.attributes["settings"] = settings
    return config


def upgrade_database(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (creating the SQLite folder when needed)."""
    if settings.is_sqlite:
        settings.ensure_data_dir()
    command.upgrade(alembic_config(settings), revision)


def downgrade_database(settings: Settings, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(settings), revision)
