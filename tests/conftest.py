"""Shared fixtures: a real database built from the migrations, the app, users and sign-in helpers.

DB-backed tests run on SQLite (a file in a temporary folder) and, when ``TEST_DATABASE_URL`` is
set, also on Postgres (fixture ids ``sqlite`` / ``postgres``). For Postgres a fresh database is
created on that server for the test run and dropped afterwards, so runs never see each other.
Isolation between tests: every table is emptied after each test that used ``settings``, which
works the same on both databases and also covers data committed by the CLI or other processes.

One rule narrows the two databases to one: a test marked ``@production_database`` runs on
Postgres only when ``TEST_DATABASE_URL`` is set (on SQLite otherwise). It is for the long tests
that drive real worker processes through a path whose SQLite side another test already proves
with real processes (the end-to-end tests run ``tessera serve`` on SQLite), while the database
work on that path is proven on both databases in-process. Tests of leases, the reaper and
requeues stay on both: that is where the databases behave differently (locking, timestamps).
Each marked test says in its docstring which tests cover its SQLite side.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.engine import make_url

from backend.accounts import users as user_service
from backend.config import Settings
from backend.db import dispose_engines, get_engine, session_scope, upgrade_database
from backend.main import create_app
from backend.models import Role

TEST_PASSWORD = "correct-horse-battery"
# Cheap argon2 for tests: the cost is a setting, the algorithm is the production one.
FAST_HASHING = {"argon2_time_cost": 1, "argon2_memory_cost_kib": 1024}
_DATABASE_KINDS = ["sqlite"] + (["postgres"] if os.environ.get("TEST_DATABASE_URL") else [])
#: The database a deployment runs on: Postgres when this run has one, else SQLite.
PRODUCTION_DATABASE = _DATABASE_KINDS[-1]
#: Run a test on ``PRODUCTION_DATABASE`` only (see the module docstring for when that is right).
production_database = pytest.mark.parametrize("db_url", [PRODUCTION_DATABASE], indirect=True, scope="session")
_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def _create_postgres_database(base_url: str) -> tuple[str, Callable[[], None]]:
    """Create an empty database next to ``base_url``'s and return its URL and a dropper."""
    url = make_url(base_url)
    name = f"tessera_test_{uuid.uuid4().hex[:10]}"
    admin_engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        dispose_engines()
        with admin_engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()

    return url.set(database=name).render_as_string(hide_password=False), drop


def new_database_url(kind: str, folder: Path) -> tuple[str, Callable[[], None]]:
    """An empty database of ``kind`` (``sqlite`` or ``postgres``) and a function that removes it."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'tessera.db'}", dispose_engines
    return _create_postgres_database(os.environ["TEST_DATABASE_URL"])


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Redis when ``TEST_REDIS_URL`` is set, else kombu's SQLite transport in a temporary file."""
    redis_url = os.environ.get("TEST_REDIS_URL")
    if redis_url:
        return redis_url
    return f"sqla+sqlite:///{tmp_path_factory.mktemp('broker') / 'broker.db'}"


#: Measures the planner's step calibrations of the tiny runs into the file named by ``argv[1]``.
_CALIBRATE_TINY_RUNS = """
import sys
from tests.training.helpers import TINY_BASELINE, TINY_PATCHGD
from worker.patchgd.config import config_from_dict
from worker.patchgd.memory import calibrate_step

for algorithm, hyperparameters in (("patchgd", TINY_PATCHGD), ("baseline", TINY_BASELINE)):
    config = config_from_dict(algorithm, dict(hyperparameters, num_classes=2, backbone="resnet18"))
    calibrate_step(config, "cpu", cache_file=sys.argv[1])
"""


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A planner's calibration file (``memory_calibration.json``) with resnet18's CPU step
    calibrations for the tiny runs' sizes (64 px images, 32 px patches), measured once per test
    run the way a worker measures them, in a fresh interpreter (so no calibration this process
    already holds in memory can stop the file from being written).

    Tests that plan these sizes copy it into their data folder, so that each plan does not
    measure the same thing again; tests/worker/test_memory_plan_worker.py keeps proving a plan
    measured from nothing by a real worker."""
    path = tmp_path_factory.mktemp("calibration") / "memory_calibration.json"
    subprocess.run(
        [sys.executable, "-c", _CALIBRATE_TINY_RUNS, str(path)],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        timeout=900,
    )
    assert len(json.loads(path.read_text())) == 2, path.read_text()
    return path


@pytest.fixture(scope="session", params=_DATABASE_KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database migrated to head, shared by the tests of one run (emptied after each test)."""
    folder = tmp_path_factory.mktemp(f"db-{request.param}")
    url, remove = new_database_url(request.param, folder)
    upgrade_database(Settings(data_dir=folder, database_url=url, **FAST_HASHING))
    yield url
    remove()


def _empty_all_tables(url: str) -> None:
    engine = get_engine(Settings(database_url=url, data_dir=Path("/nonexistent")))
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            if table.name != "alembic_version":
                connection.execute(table.delete())


@pytest.fixture
def settings(db_url: str, broker_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: its own data folder, the shared test database, cheap hashing."""
    yield Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url=broker_url,
        secret_key="test-secret-key",
        login_max_failures=5,
        health_broker_timeout_seconds=1.0,
        # Test processes build hundreds of apps; freezing each one's heap would keep them all.
        web_gc_freeze=False,
        **FAST_HASHING,
    )
    _empty_all_tables(db_url)


class SyncClient:
    """Synchronous facade over ``httpx.AsyncClient`` + ``ASGITransport``; cookies persist like a browser."""

    def __init__(
        self,
        app: Any,
        portal: anyio.from_thread.BlockingPortal,
        base_url: str = "http://testserver",
        raise_app_exceptions: bool = True,
        client_ip: str = "127.0.0.1",
    ) -> None:
        self.app = app
        self._portal = portal
        transport = httpx.ASGITransport(
            app=app, raise_app_exceptions=raise_app_exceptions, client=(client_ip, 50000)
        )
        self._client = httpx.AsyncClient(transport=transport, base_url=base_url)

    @property
    def cookies(self) -> httpx.Cookies:
        """The cookie jar (like a browser's)."""
        return self._client.cookies

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request through the app and wait for the response."""
        return self._portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """GET ``url``."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """POST ``url``."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """PUT ``url``."""
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        """PATCH ``url``."""
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """DELETE ``url``."""
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        """Release the underlying client."""
        self._portal.call(self._client.aclose)


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    """An event loop in a background thread that test clients run on."""
    with anyio.from_thread.start_blocking_portal() as blocking_portal:
        yield blocking_portal


@pytest.fixture
def make_client(
    settings: Settings, portal: anyio.from_thread.BlockingPortal
) -> Iterator[Callable[..., SyncClient]]:
    """Factory of independent clients (separate cookie jars) on the app; pass settings for a different app
    and ``client_ip`` for the address the app sees the client connect from."""
    app = create_app(settings)
    clients: list[SyncClient] = []

    def factory(
        app_settings: Settings | None = None,
        base_url: str = "http://testserver",
        client_ip: str = "127.0.0.1",
    ) -> SyncClient:
        client = SyncClient(
            create_app(app_settings) if app_settings else app, portal, base_url, client_ip=client_ip
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., SyncClient]) -> SyncClient:
    """A client for the app, like one browser."""
    return make_client()


@dataclass(frozen=True)
class TestUser:
    """A user created for a test, with the plaintext password it can sign in with."""

    id: int
    username: str
    password: str
    role: Role

    __test__ = False  # not a test class, despite the name


@pytest.fixture
def make_user(settings: Settings) -> Callable[..., TestUser]:
    """Create a committed user: ``make_user("alice", role=Role.ADMIN, active=False)``."""
    counter = iter(range(1, 10_000))

    def factory(
        username: str | None = None,
        *,
        password: str = TEST_PASSWORD,
        role: Role = Role.MEMBER,
        active: bool = True,
    ) -> TestUser:
        name = username or f"user{next(counter)}"
        with session_scope(settings) as session:
            user = user_service.create_user(session, settings, name, password, role)
            user.is_active = active
            session.flush()
            return TestUser(id=user.id, username=user.username, password=password, role=role)

    return factory


def login_form_token(client: SyncClient) -> str:
    """Open the sign-in page and return the form's CSRF token (the page also sets its cookie)."""
    page = client.get("/login")
    assert page.status_code == 200
    match = _CSRF_INPUT.search(page.text)
    assert match, "the login form has no csrf_token field"
    return match.group(1)


def page_csrf_token(client: SyncClient, path: str = "/settings") -> str:
    """The signed-in session's CSRF token, read from a page's form."""
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = _CSRF_INPUT.search(page.text)
    assert match, f"{path} has no csrf_token field"
    return match.group(1)


@pytest.fixture
def login() -> Callable[[SyncClient, TestUser], str]:
    """Sign ``user`` in on ``client`` through the login form; returns the session's CSRF token."""

    def do_login(client: SyncClient, user: TestUser) -> str:
        token = login_form_token(client)
        response = client.post(
            "/login", data={"username": user.username, "password": user.password, "csrf_token": token}
        )
        assert response.status_code == 303, response.text
        return page_csrf_token(client)

    return do_login


@pytest.fixture
def bearer() -> Callable[[SyncClient, TestUser], dict[str, str]]:
    """Get an access token with the OAuth2 password flow; returns the Authorization header."""

    def get_header(client: SyncClient, user: TestUser) -> dict[str, str]:
        response = client.post(
            "/api/v1/auth/token", data={"username": user.username, "password": user.password}
        )
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    return get_header


@pytest.fixture(params=_DATABASE_KINDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A brand-new, unmigrated database of each kind (for migration tests)."""
    url, remove = new_database_url(request.param, tmp_path)
    yield url
    remove()
