"""Load benchmark: a real `tessera serve` under many concurrent clients, on SQLite and Postgres.

For each database it starts `tessera serve` in a temporary data folder, creates a personal token
and a browser session for the first admin, then runs two scenarios against ``GET /api/v1/users/me``:

* ``saturation``: ``--clients`` clients with no think time for ``--duration`` s (half with the
  bearer token, half with the session cookie), plus a storm of ``--logins`` parallel
  ``POST /api/v1/auth/token`` (real argon2 cost) two seconds in;
* ``polling``: ``--poll-clients`` clients each asking once a second (like a live page) for
  ``--poll-duration`` s.

Every non-200 answer and every request that failed or timed out counts as an error. It prints a
table and writes ``bench/results/load_<db>.json``. The web process never imports torch, and
neither does this script.

    python -m bench.load                      # SQLite, and Postgres when TEST_DATABASE_URL is set
    python -m bench.load --db sqlite --duration 5 --poll-duration 5   # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "load-benchmark-password"
START_TIMEOUT_SECONDS = 120.0
REQUEST_TIMEOUT_SECONDS = 60.0
_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Tally:
    """Latencies of successful requests and a count of every kind of failure."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, started: float, outcome: str | None) -> None:
        if outcome is None:
            self.latencies.append(time.perf_counter() - started)
        else:
            self.errors[outcome] = self.errors.get(outcome, 0) + 1

    def summary(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2) if ordered else None

        errors = sum(self.errors.values())
        return {
            "requests": len(ordered) + errors,
            "ok": len(ordered),
            "errors": errors,
            "error_kinds": self.errors,
            "requests_per_s": round(len(ordered) / seconds, 1),
            "p50_ms": quantile(0.50),
            "p99_ms": quantile(0.99),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
        }


async def _timed(client: httpx.AsyncClient, tally: Tally, method: str, url: str, **kwargs: Any) -> None:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
        tally.record(started, None if response.status_code == 200 else f"http {response.status_code}")
    except httpx.HTTPError as exc:
        tally.record(started, type(exc).__name__)


def _client(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, as browsers
    # do; otherwise a request sent on a connection the server is just closing fails with ReadError.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=3.0)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


async def _sign_in(base_url: str) -> tuple[str, httpx.Cookies]:
    """A personal token (bearer) and a signed-in browser's cookies for the admin."""
    async with _client(base_url) as http:
        issued = await http.post(
            "/api/v1/auth/token", data={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
        )
        issued.raise_for_status()
        access = {"Authorization": f"Bearer {issued.json()['access_token']}"}
        created = await http.post("/api/v1/tokens", json={"name": "load benchmark"}, headers=access)
        created.raise_for_status()
        personal = created.json()["token"]
    async with _client(base_url) as browser:
        page = await browser.get("/login")
        match = _CSRF_INPUT.search(page.text)
        assert match, "the login page has no csrf_token"
        signed_in = await browser.post(
            "/login",
            data={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD, "csrf_token": match.group(1)},
        )
        assert signed_in.status_code == 303, signed_in.text
        return personal, browser.cookies


async def saturation(base_url: str, clients: int, duration: float, logins: int) -> dict[str, Any]:
    """``clients`` loops with no think time on /users/me, and a login storm two seconds in."""
    token, cookies = await _sign_in(base_url)
    reads, storm = Tally(), Tally()
    deadline = time.perf_counter() + duration

    async with _client(base_url) as bearer_http, _client(base_url, cookies=cookies) as cookie_http:
        headers = {"Authorization": f"Bearer {token}"}

        async def reader(index: int) -> None:
            http, extra = (bearer_http, {"headers": headers}) if index % 2 == 0 else (cookie_http, {})
            while time.perf_counter() < deadline:
                await _timed(http, reads, "GET", "/api/v1/users/me", **extra)

        async def login_storm() -> None:
            await asyncio.sleep(min(2.0, duration / 4))
            form = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
            async with _client(base_url) as http:
                await asyncio.gather(
                    *(_timed(http, storm, "POST", "/api/v1/auth/token", data=form) for _ in range(logins))
                )

        started = time.perf_counter()
        await asyncio.gather(login_storm(), *(reader(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return {"reads": reads.summary(elapsed), "login_storm": storm.summary(elapsed), "seconds": elapsed}


_BUCKET = re.compile(
    r"^tessera_http_request_duration_seconds_bucket\{(?P<labels>[^}]*)\} (?P<count>[0-9.e+]+)$", re.MULTILINE
)


async def server_latency_buckets(http: httpx.AsyncClient, route: str) -> dict[float, float]:
    """The server's own latency histogram for GET ``route`` (cumulative count per bucket bound),
    read from ``/metrics``: time spent inside the application, without the client or the network."""
    text_ = (await http.get("/metrics")).text
    buckets: dict[float, float] = {}
    for match in _BUCKET.finditer(text_):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("route") == route and labels.get("method") == "GET":
            bound = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + float(match["count"])
    return buckets


def server_side_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Requests counted by the server between two scrapes, and the share slower than each bound.

    Prometheus buckets are coarse, so this gives bounds, not exact quantiles: ``p99_at_most_ms``
    is the smallest bucket bound that holds at least 99 % of the requests."""
    bounds = sorted(after)
    counts = {b: after[b] - before.get(b, 0.0) for b in bounds}
    total = counts[bounds[-1]] if bounds else 0.0
    p99 = next((b for b in bounds if total and counts[b] >= 0.99 * total), None)
    return {
        "requests": int(total),
        "p99_at_most_ms": None if p99 is None else (None if p99 == float("inf") else round(p99 * 1000, 1)),
        "share_over_ms": {
            str(round(b * 1000, 1)): round(1 - counts[b] / total, 5)
            for b in bounds
            if total and b != float("inf")
        },
    }


async def polling(base_url: str, clients: int, duration: float) -> dict[str, Any]:
    """``clients`` pages each asking once a second, spread evenly over the second."""
    token, cookies = await _sign_in(base_url)
    tally = Tally()
    async with _client(base_url) as http:
        before = await server_latency_buckets(http, "/api/v1/users/me")
    async with _client(base_url) as bearer_http, _client(base_url, cookies=cookies) as cookie_http:
        headers = {"Authorization": f"Bearer {token}"}
        start = time.perf_counter() + 0.5

        async def page(index: int) -> None:
            http, extra = (bearer_http, {"headers": headers}) if index % 2 == 0 else (cookie_http, {})
            offset = index / clients + random.uniform(0, 0.5 / clients)
            tick = 0
            while (due := start + offset + tick) < start + duration:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await _timed(http, tally, "GET", "/api/v1/users/me", **extra)
                tick += 1

        await asyncio.gather(*(page(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    async with _client(base_url) as http:
        after = await server_latency_buckets(http, "/api/v1/users/me")
    return {"reads": tally.summary(elapsed), "server": server_side_summary(before, after), "seconds": elapsed}


@contextmanager
def postgres_database(base_url: str) -> Iterator[str]:
    """A fresh database next to ``base_url``'s, dropped afterwards."""
    url = make_url(base_url)
    name = f"tessera_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wait_until_answering(
    process: subprocess.Popen[bytes],
    log: Any,
    url: str,
    what: str,
    timeout: float,
    interval: float,
    ok: Callable[[int], bool],
) -> None:
    """Poll ``url`` until its status code is ``ok``; raise with ``log`` if ``process`` exits first,
    or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{what} exited:\n{log.read().decode(errors='replace')}")
        try:
            if ok(httpx.get(url, timeout=2).status_code):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer in time")
        time.sleep(interval)


@contextmanager
def served(database_url: str, port: int, broker_url: str | None) -> Iterator[str]:
    """`tessera serve` in a temporary data folder; yields its base URL and stops it afterwards."""
    with tempfile.TemporaryDirectory(prefix="tessera-load-") as folder:
        env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
        env.update(
            TESSERA_DATA_DIR=str(Path(folder) / "data"),
            TESSERA_PORT=str(port),
            TESSERA_ADMIN_USERNAME=ADMIN_USERNAME,
            TESSERA_ADMIN_PASSWORD=ADMIN_PASSWORD,
            TESSERA_LOG_LEVEL="WARNING",
            # The web server is what is measured: no demo dataset built by the worker meanwhile.
            TESSERA_DEMO_DATASET_ON_SERVE="false",
            PYTHONPATH=str(REPO_ROOT),
        )
        if database_url:
            env["TESSERA_DATABASE_URL"] = database_url
        if broker_url:
            env["TESSERA_BROKER_URL"] = broker_url
        log = open(Path(folder) / "serve.log", "w+b")  # noqa: SIM115 (read back on failure)
        process = subprocess.Popen(
            [sys.executable, "-c", "from backend.cli import app; app()", "serve"],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(
                process,
                log,
                f"{base_url}/login",
                "serve",
                START_TIMEOUT_SECONDS,
                0.5,
                lambda code: code == 200,
            )
            yield base_url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            log.seek(0)
            errors = [line for line in log.read().decode(errors="replace").splitlines() if "ERROR" in line]
            if errors:
                print(f"  serve logged {len(errors)} ERROR lines, first: {errors[0][:300]}")
            log.close()


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both scenarios against a fresh server on the database ``kind``."""

    def scenarios(database_url: str) -> dict[str, Any]:
        with served(database_url, args.port, args.broker_url) as base_url:
            saturated = asyncio.run(saturation(base_url, args.clients, args.duration, args.logins))
            polled = asyncio.run(polling(base_url, args.poll_clients, args.poll_duration))
        return {"saturation": saturated, "polling": polled}

    if kind == "sqlite":
        results = scenarios("")
    else:
        with postgres_database(args.postgres_url) as url:
            results = scenarios(url)
    return {
        "database": kind,
        "config": {
            key: getattr(args, key)
            for key in ("clients", "duration", "logins", "poll_clients", "poll_duration")
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    columns = ["db", "scenario", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms"]
    rows = []
    for result in results:
        for scenario, part in (
            ("saturation reads", result["saturation"]["reads"]),
            ("login storm", result["saturation"]["login_storm"]),
            ("polling 1/s", result["polling"]["reads"]),
        ):
            rows.append(
                [
                    result["database"],
                    scenario,
                    part["requests"],
                    part["errors"],
                    part["requests_per_s"],
                    part["p50_ms"],
                    part["p99_ms"],
                    part["max_ms"],
                ]
            )
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_dbs = ["sqlite"] + (["postgres"] if os.environ.get("TEST_DATABASE_URL") else [])
    parser.add_argument("--db", action="append", choices=["sqlite", "postgres"], help="repeatable")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_DATABASE_URL", ""))
    parser.add_argument("--broker-url", default=None, help="default: serve's SQLite broker")
    parser.add_argument("--port", type=int, default=18160)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--logins", type=int, default=50)
    parser.add_argument("--poll-clients", type=int, default=200)
    parser.add_argument("--poll-duration", type=float, default=30.0)
    parser.add_argument("--tag", default="", help="suffix of the JSON file names")
    args = parser.parse_args()
    kinds = args.db or default_dbs
    if "postgres" in kinds and not args.postgres_url:
        parser.error("postgres needs --postgres-url or TEST_DATABASE_URL")
    results = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        print(f"== {kind}", flush=True)
        result = run(kind, args)
        results.append(result)
        path = RESULTS / f"load_{kind}{args.tag}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {path.relative_to(REPO_ROOT)}", flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
