"""CPU time the web process spends per request on the hot polling paths, independent of load.

A real uvicorn (the command line ``tessera serve`` uses) serves the app on a fresh database
(SQLite in a temporary folder, or a new database on ``--postgres-url``); this process sends
``--requests`` sequential requests per path and reads the server's CPU time (user + system, all
threads, from ``/proc/<pid>/stat``) before and after, so a busy machine slows the run but barely
changes the figure. Each path is measured ``--repeats`` times (interleaved) to show the spread.

Then, with ``--profile``, the same requests go in-process through ``httpx.ASGITransport`` under
cProfile, and the functions with the most own time are listed per path.

    python -m bench.request_cpu                      # SQLite
    python -m bench.request_cpu --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Prints a table and saves ``bench/results/request_cpu[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.load import wait_until_answering

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
USERNAME = "bench-admin"
PASSWORD = "bench-password-long-enough"
_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')
_TICKS = os.sysconf("SC_CLK_TCK")
#: What the cumulative profile lists: the application, FastAPI's routing and dependencies, ORM sessions.
_OWN_CODE = r"backend|fastapi/(routing|dependencies)|sqlalchemy/orm/session"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def database(postgres_url: str, folder: Path) -> Iterator[str]:
    """A fresh database URL: SQLite in ``folder``, or a new database next to ``postgres_url``'s."""
    if not postgres_url:
        yield f"sqlite:///{folder / 'tessera.db'}"
        return
    url = make_url(postgres_url)
    name = f"tessera_cpu_{os.getpid()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def settings_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """The environment the app is configured from (also used in-process for the profile)."""
    return {
        "TESSERA_DATA_DIR": str(data_dir),
        "TESSERA_DATABASE_URL": database_url,
        "TESSERA_BROKER_URL": f"sqla+sqlite:///{data_dir / 'broker.db'}",
        "TESSERA_SECRET_KEY": "bench-secret-key",
        "TESSERA_ARGON2_TIME_COST": "1",
        "TESSERA_ARGON2_MEMORY_COST_KIB": "1024",
    }


def seed(env: dict[str, str]) -> int:
    """Migrate, and create the user, a ready dataset, a built-in backbone and a running task; the task id."""
    from backend.accounts import users as user_service
    from backend.config import Settings
    from backend.db import session_scope, upgrade_database
    from backend.models import Backbone, BackboneStatus, Dataset, Role, Task
    from backend.models.dataset import DatasetStatus
    from backend.models.task import TaskStatus

    settings = Settings(
        data_dir=Path(env["TESSERA_DATA_DIR"]),
        database_url=env["TESSERA_DATABASE_URL"],
        secret_key=env["TESSERA_SECRET_KEY"],
        argon2_time_cost=1,
        argon2_memory_cost_kib=1024,
    )
    upgrade_database(settings)
    with session_scope(settings) as session:
        user = user_service.create_user(session, settings, USERNAME, PASSWORD, Role.ADMIN)
        session.flush()
        dataset = Dataset(
            owner_id=user.id,
            name="bench",
            status=DatasetStatus.READY,
            num_images=16,
            num_classes=2,
            summary={"classes": ["cat", "dog"]},
        )
        backbone = Backbone(
            owner_id=None,
            name="resnet18",
            architecture="resnet18",
            builtin_key="resnet18",
            source="builtin",
            status=BackboneStatus.READY,
            details={},
            problems=[],
        )
        session.add_all([dataset, backbone])
        session.flush()
        task = Task(
            owner_id=user.id,
            name="bench task",
            dataset_id=dataset.id,
            backbone_id=backbone.id,
            algorithm="patchgd",
            hyperparameters={"image_size": 64, "patch_size": 32, "batch_size": 4, "epochs": 2},
            status=TaskStatus.RUNNING,
            attempts=1,
            max_attempts=3,
            plan={},
            final_metrics={},
            artifacts={},
        )
        session.add(task)
        session.flush()
        return task.id


async def sign_in(http: httpx.AsyncClient) -> tuple[dict[str, str], httpx.Cookies]:
    """A bearer header (personal token, as a script would use) and a signed-in browser's cookies."""
    issued = await http.post("/api/v1/auth/token", data={"username": USERNAME, "password": PASSWORD})
    issued.raise_for_status()
    access = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    created = await http.post("/api/v1/tokens", json={"name": "cpu benchmark"}, headers=access)
    created.raise_for_status()
    bearer = {"Authorization": f"Bearer {created.json()['token']}"}
    page = await http.get("/login")
    match = _CSRF_INPUT.search(page.text)
    assert match, "the login page has no csrf_token"
    signed_in = await http.post(
        "/login", data={"username": USERNAME, "password": PASSWORD, "csrf_token": match.group(1)}
    )
    assert signed_in.status_code == 303, signed_in.text
    cookies = httpx.Cookies(http.cookies)
    http.cookies.clear()
    return bearer, cookies


def paths(task_id: int, bearer: dict[str, str], cookies: httpx.Cookies) -> dict[str, dict[str, Any]]:
    """The measured requests: name -> (url, headers, cookies, expected status)."""
    htmx = {"HX-Request": "true"}
    return {
        "users_me_bearer": {"url": "/api/v1/users/me", "headers": bearer, "status": 200},
        "users_me_cookie": {"url": "/api/v1/users/me", "cookies": cookies, "status": 200},
        "task_bearer": {"url": f"/api/v1/tasks/{task_id}", "headers": bearer, "status": 200},
        "task_status_fragment": {
            "url": f"/tasks/{task_id}/status?epochs=0&event=0",
            "headers": htmx,
            "cookies": cookies,
            "status": 200,
        },
        "not_found_api": {"url": "/api/v1/nothing/here", "headers": bearer, "status": 404},
    }


async def _send(http: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    http.cookies.clear()
    if spec.get("cookies"):
        http.cookies.update(spec["cookies"])
    response = await http.get(spec["url"], headers=spec.get("headers"))
    if response.status_code != spec["status"]:
        raise RuntimeError(f"{spec['url']}: {response.status_code} {response.text[:300]}")


@contextmanager
def served(
    env: dict[str, str], port: int, folder: Path, root: Path = REPO_ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """uvicorn with the options of ``tessera serve``'s web process, running the code in ``root``;
    yields the process."""
    from backend.config import Settings
    from backend.supervisor import web_command

    server_env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    server_env.update(env, TESSERA_PORT=str(port), TESSERA_HOST="127.0.0.1", PYTHONPATH=str(root))
    command = web_command(Settings(host="127.0.0.1", port=port, data_dir=Path(env["TESSERA_DATA_DIR"])))
    log = open(folder / f"web-{port}.log", "w+b")  # noqa: SIM115 (read back on failure)
    process = subprocess.Popen(command, env=server_env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_answering(
            process, log, f"http://127.0.0.1:{port}/healthz", "the server", 60, 0.3, lambda code: code < 600
        )
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def measure_server(
    env: dict[str, str], task_id: int, args: argparse.Namespace, folder: Path, roots: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """CPU ms per request of the server process, per code tree in ``roots`` and path, ``args.repeats``
    times; the trees' servers run side by side and are measured in turn, so both see the same machine."""
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in roots}
    with ExitStack() as stack:
        servers = {
            label: (stack.enter_context(served(env, port := _free_port(), folder, root)), port)
            for label, root in roots.items()
        }
        clients = {}
        for label, (_, port) in servers.items():
            http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
            bearer, cookies = await sign_in(http)
            clients[label] = (http, paths(task_id, bearer, cookies))
            for spec in clients[label][1].values():  # warm up: imports, templates, caches, the pool
                for _ in range(args.warmup):
                    await _send(http, spec)
        try:
            for _ in range(args.repeats):
                for name in clients[next(iter(clients))][1]:
                    for label, (http, specs) in clients.items():
                        pid = servers[label][0].pid
                        before = process_cpu_seconds(pid)
                        for _ in range(args.requests):
                            await _send(http, specs[name])
                        spent = process_cpu_seconds(pid) - before
                        samples[label].setdefault(name, []).append(round(spent * 1000 / args.requests, 3))
        finally:
            for http, _ in clients.values():
                await http.aclose()
    return {
        label: {
            name: {"runs_ms": values, "median_ms": round(statistics.median(values), 3), "min_ms": min(values)}
            for name, values in by_path.items()
        }
        for label, by_path in samples.items()
    }


async def profile_in_process(env: dict[str, str], task_id: int, args: argparse.Namespace) -> dict:
    """cProfile top functions (own time) of ``args.requests`` in-process requests per path."""
    os.environ.update(env)
    from backend.config import get_settings
    from backend.main import create_app

    get_settings.cache_clear()
    app = create_app()
    # cProfile sees one thread: run what would go to the thread pool inline, so it is counted.
    import anyio.to_thread

    async def run_inline(func, *args, **_kwargs):  # noqa: ANN001, ANN002, ANN202
        return func(*args)

    anyio.to_thread.run_sync = run_inline
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        bearer, cookies = await sign_in(http)
        for name, spec in paths(task_id, bearer, cookies).items():
            for _ in range(args.warmup):
                await _send(http, spec)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.requests):
                await _send(http, spec)
            profiler.disable()
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(
                r"backend|fastapi/(routing|dependencies)|sqlalchemy/orm/session", args.top
            )
            out[name] = stream.getvalue().splitlines()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--postgres-url", default="", help="measure on a new database there (default: SQLite)"
    )
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per path and run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="also list cProfile's top functions")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another copy of the code (e.g. `git archive` of an earlier commit) measured side by side",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tessera-cpu-") as tmp:
        folder = Path(tmp)
        with database(args.postgres_url, folder) as database_url:
            env = settings_env(database_url, folder / "data")
            task_id = seed(env)
            started = time.time()
            load_before = os.getloadavg()
            roots = {"current": REPO_ROOT}
            if args.baseline:
                roots["baseline"] = args.baseline.resolve()
            measured = asyncio.run(measure_server(env, task_id, args, folder, roots))
            result: dict[str, Any] = {
                "database": "postgres" if args.postgres_url else "sqlite",
                "requests_per_run": args.requests,
                "repeats": args.repeats,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "seconds": round(time.time() - started, 1),
                "python": sys.version.split()[0],
                "baseline": str(args.baseline) if args.baseline else None,
                "cpu_ms_per_request": measured,
            }
            if args.profile:
                result["profile"] = asyncio.run(profile_in_process(env, task_id, args))
    print(f"{result['database']}: CPU ms per request of the web process (median, min of {args.repeats} runs)")
    for label, rows in measured.items():
        print(f" {label}")
        for name, row in rows.items():
            print(f"  {name:24s} {row['median_ms']:7.2f} {row['min_ms']:7.2f}   runs {row['runs_ms']}")
    print(f"  load average {result['loadavg_before']} -> {result['loadavg_after']}")
    if args.profile:
        for name, lines in result["profile"].items():
            print(f"\n--- {name} ---")
            print("\n".join(lines[: args.top + 12]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"request_cpu{'_' + args.tag if args.tag else ''}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {target.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
