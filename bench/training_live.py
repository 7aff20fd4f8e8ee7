"""The live view of a training task, measured: status polling under 100 pages, queued → running
latency, the cost of progress writes to training, and HTMX polling against Server-Sent Events.

For each database it starts `tessera serve` (web server, worker, beat) in a temporary data folder
(as ``bench/load.py`` does), uploads a small dataset through the API and lets serve's worker
validate it, then:

* ``claim_latency``: with the worker idle, creates ``--claims`` tasks one after the other and
  measures queued → running: the row's ``started_at - created_at`` (both server clocks) and what a
  client polling ``GET /api/v1/tasks/{id}`` every 20 ms sees; each task is cancelled before the next.
* ``poll``: while a PatchGD task trains on the worker, ``--clients`` signed-in pages each poll the
  task's status fragment (``GET /tasks/{id}/status?epochs=..&event=..``, the one the page polls,
  following the ``data-epochs``/``data-event`` each answer carries) once a second for
  ``--duration`` s; then the same with the tasks list's fragment (``GET /tasks/rows``).
* ``sse_vs_poll``: a second web process of the same app plus one SSE route (below) on the same
  database; ``--clients`` pages either poll the fragment every 2 s (what the page does) or hold an
  SSE stream that re-reads the row every second and pushes the fragment when it changed. Reports
  the web process's CPU seconds per second of each, and the delivery of changes.
* ``progress_writes`` (once, SQLite): the engine trains the same tiny PatchGD task in this
  process with no progress callback, then with the worker's progress writer (``_Lease``) writing
  every step, then at the default interval; images/s of each (alternated, median of
  ``--repeats``), and the measured cost of one write: its wall time and its CPU time on the
  writer's thread (``time.thread_time``). The CPU time does not depend on how busy the machine is,
  so ``writer_cpu_share_bound_percent`` (CPU per write / the default interval: at most one write
  per interval) bounds what the writer can take from training even where images/s are too noisy
  to compare; ``writer_cpu_share_percent`` is the same at this run's own write rate.
  ``--only-progress`` runs this part alone (no server).

Every non-200 answer or failed request counts as an error. Prints a summary and writes
``bench/results/training_live_<db>.json``.

    python -m bench.training_live                       # SQLite, and Postgres with TEST_DATABASE_URL
    python -m bench.training_live --db sqlite --duration 10 --claims 3   # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request

from backend.deps import CurrentUser  # the SSE route's annotations are resolved from this module
from bench.load import (
    RESULTS,
    Tally,
    _client,
    _sign_in,
    postgres_database,
    served,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
_EPOCHS = re.compile(r'data-epochs="(\d+)" data-event="(\d+)"')
TINY = {"image_size": 64, "patch_size": 32, "warmup_epochs": 0}


def _dataset_zip(per_class: int = 12, size: int = 64) -> bytes:
    """Two classes of noisy PNGs (a dataset of the size the tests train on)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c] //= 2
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                archive.writestr(f"{name}/{i}.png", out.getvalue())
    return buffer.getvalue()


async def _wait(what: str, check, timeout: float = 300.0, every: float = 0.2):  # noqa: ANN001, ANN202
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


class Api:
    """The admin's bearer-token client."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> Any:
        response = await self.http.get(f"/api/v1{path}", headers=self.headers)
        response.raise_for_status()
        return response.json()

    async def post(self, path: str, **kwargs: Any) -> Any:
        response = await self.http.post(f"/api/v1{path}", headers=self.headers, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
        return response.json()


async def _prepare(api: Api) -> tuple[int, int]:
    """A ready dataset (validated by serve's worker) and the built-in resnet18's id."""
    dataset = await api.post(
        "/datasets", data={"name": "live"}, files={"file": ("live.zip", _dataset_zip(), "application/zip")}
    )

    async def ready() -> bool:
        status = (await api.get(f"/datasets/{dataset['id']}"))["status"]
        if status == "failed":
            raise RuntimeError("the benchmark dataset failed validation")
        return status == "ready"

    await _wait("the dataset", ready)
    backbone = next(
        b for b in await api.get("/backbones") if b["architecture"] == "resnet18" and b["builtin"]
    )
    return dataset["id"], backbone["id"]


async def _create(api: Api, dataset_id: int, backbone_id: int, name: str, **hp: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": "patchgd",
        "hyperparameters": {**TINY, **hp},
    }
    return await api.post("/tasks", json=body)


async def _until_status(api: Api, task_id: int, wanted: set[str], every: float = 0.02) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await api.get(f"/tasks/{task_id}")
        return body if body["status"] in wanted else None

    return await _wait(f"task {task_id} to be {wanted}", check, every=every)


def _seconds(later: str, earlier: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def claim_latency(api: Api, dataset_id: int, backbone_id: int, count: int) -> dict[str, Any]:
    """queued → running with an idle worker, ``count`` times (each task cancelled before the next)."""
    row, seen = [], []
    for i in range(count):
        await asyncio.sleep(1.0)  # the worker is idle again
        started = time.perf_counter()
        task = await _create(api, dataset_id, backbone_id, f"claim {i}", epochs=50, batch_size=2)
        body = await _until_status(api, task["id"], {"running", "succeeded", "failed", "cancelled"})
        seen.append(time.perf_counter() - started)
        row.append(_seconds(body["started_at"], body["created_at"]))
        await api.post(f"/tasks/{task['id']}/cancel")
        await _until_status(api, task["id"], {"cancelled", "failed", "succeeded"}, every=0.2)

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median_s": round(statistics.median(values), 3),
            "max_s": round(max(values), 3),
            "all_s": [round(v, 3) for v in values],
        }

    return {"count": count, "row_started_minus_created": stats(row), "client_observed": stats(seen)}


async def poll_pages(
    base_url: str, cookies: httpx.Cookies, path_of, clients: int, duration: float, every: float
) -> dict[str, Any]:  # noqa: ANN001, E501
    """``clients`` pages each asking ``path_of(state)`` every ``every`` s, spread evenly; each
    answer's ``data-epochs``/``data-event`` become the next request's (as the page's hx-get)."""
    tally = Tally()
    sizes: list[int] = []
    async with _client(base_url, cookies=cookies) as http:
        start = time.perf_counter() + 0.5

        async def page(index: int) -> None:
            state = {"epochs": 0, "event": 0}
            offset = every * index / clients
            tick = 0
            while (due := start + offset + tick * every) < start + duration:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                began = time.perf_counter()
                try:
                    response = await http.get(path_of(state))
                except httpx.HTTPError as exc:
                    tally.record(began, type(exc).__name__)
                else:
                    tally.record(
                        began, None if response.status_code == 200 else f"http {response.status_code}"
                    )
                    sizes.append(len(response.content))
                    found = _EPOCHS.search(response.text)
                    if found:
                        state = {"epochs": int(found.group(1)), "event": int(found.group(2))}
                tick += 1

        await asyncio.gather(*(page(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    summary = tally.summary(elapsed)
    summary["mean_bytes"] = round(statistics.mean(sizes)) if sizes else 0
    return summary


def _web_pid(serve_pid: int) -> int:
    """The uvicorn child of a `tessera serve` (its process group)."""
    import psutil

    for child in psutil.Process(serve_pid).children(recursive=True):
        if "uvicorn" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no uvicorn process under serve")


def _cpu(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def sse_clients(
    base_url: str, cookies: httpx.Cookies, task_id: int, clients: int, duration: float
) -> dict[str, Any]:  # noqa: E501
    """``clients`` SSE streams held for ``duration`` s: events received, errors."""
    events = 0
    errors: dict[str, int] = {}

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal events
        try:
            async with http.stream("GET", f"/bench/sse/tasks/{task_id}") as response:
                if response.status_code != 200:
                    errors[f"http {response.status_code}"] = errors.get(f"http {response.status_code}", 0) + 1
                    return
                async for line in response.aiter_lines():
                    if line.startswith("event: status"):
                        events += 1
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async with _client(base_url, cookies=cookies) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(clients)]
        await asyncio.sleep(duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "clients": clients,
        "events": events,
        "events_per_client_s": round(events / clients / duration, 3),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }  # noqa: E501


def sse_app():  # noqa: ANN201 (FastAPI)
    """The web app plus one SSE route, for the comparison only (uvicorn --factory): per stream, the
    task's status fragment re-read from the database every second and sent when it changed."""
    import anyio
    from fastapi.responses import StreamingResponse

    from backend.db import session_scope
    from backend.main import create_app
    from backend.training import service, views
    from backend.ui.templating import templates

    app = create_app()
    settings = app.state.settings

    @app.get("/bench/sse/tasks/{task_id}")
    async def stream(request: Request, task_id: int, user: CurrentUser):  # noqa: ANN202 (a stream)
        def render(after_epoch: int, after_event: int) -> tuple[str, int, int]:
            with session_scope(settings) as session:
                task = service.get_task(session, user, task_id)
                context = views._context(session, task, after_epoch=after_epoch, after_event=after_event)
                html = templates.get_template("training/status.html").render({"request": request, **context})
                return html, len(context["metrics"]), context["last_event"]

        async def events():  # noqa: ANN202
            epochs, event, last = 0, 0, ""
            while not await request.is_disconnected():
                html, epochs_now, event_now = await anyio.to_thread.run_sync(render, epochs, event)
                if html != last:
                    last, epochs, event = html, epochs_now, event_now
                    data = "\n".join(f"data: {line}" for line in html.splitlines())
                    yield f"event: status\n{data}\n\n"
                await anyio.sleep(1.0)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _start_sse_web(env_source: int, port: int) -> subprocess.Popen[bytes]:
    """A second web process (same environment as serve's, so the same database) with the SSE route."""
    import psutil

    env = psutil.Process(env_source).environ()
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench.training_live:sse_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def sse_vs_poll(
    serve_pid: int, port: int, task_id: int, clients: int, duration: float
) -> dict[str, Any]:
    web = _web_pid(serve_pid)
    process = _start_sse_web(web, port)
    base_url = f"http://127.0.0.1:{port}"
    try:

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{base_url}/login", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        await _wait("the SSE web process", up, timeout=120, every=0.5)
        _, cookies = await _sign_in(base_url)
        result: dict[str, Any] = {}
        cpu = _cpu(process.pid)
        began = time.perf_counter()
        result["htmx_poll_2s"] = await poll_pages(
            base_url,
            cookies,
            lambda s: f"/tasks/{task_id}/status?epochs={s['epochs']}&event={s['event']}",
            clients,
            duration,
            2.0,
        )
        result["htmx_poll_2s"]["web_cpu_s_per_s"] = round(
            (_cpu(process.pid) - cpu) / (time.perf_counter() - began), 3
        )
        await asyncio.sleep(2)
        cpu = _cpu(process.pid)
        began = time.perf_counter()
        result["sse_1s_db_check"] = await sse_clients(base_url, cookies, task_id, clients, duration)
        result["sse_1s_db_check"]["web_cpu_s_per_s"] = round(
            (_cpu(process.pid) - cpu) / (time.perf_counter() - began), 3
        )
        return result
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _quiet_builtins(serve_pid: int) -> None:
    """Insert the catalog's built-in backbone rows as recently sent for measuring, straight into
    serve's database, so that no ``backbones.measure`` job keeps the worker busy: the claim latency
    is measured with an idle worker."""
    import psutil
    from sqlalchemy import select

    from backend.config import Settings
    from backend.db import session_scope
    from backend.models import Backbone, BackboneStatus
    from backend.models.base import utcnow
    from worker.patchgd.catalog import list_backbones as catalog_names

    env = psutil.Process(serve_pid).environ()
    settings = Settings(
        data_dir=Path(env["TESSERA_DATA_DIR"]), database_url=env.get("TESSERA_DATABASE_URL", "")
    )
    with session_scope(settings) as session:
        existing = set(session.scalars(select(Backbone.builtin_key)))
        for name in catalog_names():
            if name not in existing:
                session.add(
                    Backbone(
                        owner_id=None,
                        name=name,
                        architecture=name,
                        builtin_key=name,
                        source="builtin",
                        status=BackboneStatus.READY,
                        details={"measure_requested_at": utcnow().isoformat()},
                        problems=[],
                    )
                )


async def scenarios(base_url: str, args: argparse.Namespace, serve_pid: int) -> dict[str, Any]:
    _quiet_builtins(serve_pid)
    token, cookies = await _sign_in(base_url)
    async with _client(base_url) as http:
        api = Api(http, token)
        dataset_id, backbone_id = await _prepare(api)
        result: dict[str, Any] = {
            "claim_latency": await claim_latency(api, dataset_id, backbone_id, args.claims)
        }
        # A run long enough to outlast the polling scenarios.
        task = await _create(api, dataset_id, backbone_id, "polled", epochs=200, batch_size=2)
        await _until_status(api, task["id"], {"running"}, every=0.2)
        await asyncio.sleep(3)  # past start-up: training steps and progress writes under way
        before = await api.get(f"/tasks/{task['id']}")
        result["poll_status_fragment"] = await poll_pages(
            base_url,
            cookies,
            lambda s: f"/tasks/{task['id']}/status?epochs={s['epochs']}&event={s['event']}",
            args.clients,
            args.duration,
            1.0,
        )
        result["poll_tasks_list"] = await poll_pages(
            base_url, cookies, lambda s: "/tasks/rows", args.clients, args.duration, 1.0
        )
        after = await api.get(f"/tasks/{task['id']}")
        result["training_during_polls"] = {
            "steps": after["progress"]["step"] - before["progress"]["step"],
            "status": after["status"],
            "images_per_s": after["progress"]["images_per_s"],
        }
        if args.sse:
            result["sse_vs_poll"] = await sse_vs_poll(
                serve_pid, args.port + 1, task["id"], args.clients, args.duration
            )
        await api.post(f"/tasks/{task['id']}/cancel")
    return result


def _p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else 0.0


def progress_writes(repeats: int, steps: int) -> dict[str, Any]:
    """The engine in this process: images/s with no progress callback, with the worker's writer
    writing every step, and at the default interval (alternated runs, medians)."""
    import tempfile

    import torch
    from sqlalchemy import select
    from torch.utils.data import DataLoader, TensorDataset

    from backend.config import Settings
    from backend.db import session_scope, upgrade_database
    from backend.models import Backbone, Dataset, Role, Task, TaskStatus, User
    from backend.models.base import utcnow
    from backend.training import service
    from worker.patchgd.config import PatchGDConfig
    from worker.patchgd.train import train
    from worker.tasks.training import _Lease

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="tessera-progress-")
    default_interval = Settings.model_fields["task_progress_interval_seconds"].default
    base = Settings(data_dir=Path(folder), database_url="", broker_url="memory://")
    upgrade_database(base)
    cfg = PatchGDConfig(num_classes=2, backbone="resnet18", epochs=1, batch_size=2, seed=0, **TINY)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * steps, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 2, (2 * steps,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)

    with session_scope(base) as session:
        user = User(username="bench", password_hash="x", role=Role.MEMBER)
        session.add(user)
        session.flush()
        dataset = Dataset(owner_id=user.id, name="bench")
        backbone = Backbone(
            owner_id=None, name="resnet18", architecture="resnet18", builtin_key="resnet18-bench"
        )
        session.add_all([dataset, backbone])
        session.flush()
        task = Task(
            owner_id=user.id,
            name="bench",
            dataset_id=dataset.id,
            backbone_id=backbone.id,
            algorithm="patchgd",
            hyperparameters=cfg.to_dict(),
            status=TaskStatus.RUNNING,
            worker_id="bench",
            lease_expires_at=utcnow(),
            plan={},
            final_metrics={},
            artifacts={},
        )
        session.add(task)
        session.flush()
        task_id = task.id

    write_seconds: list[float] = []
    write_cpu_seconds: list[float] = []

    def run(interval: float | None) -> tuple[float, int]:
        if interval is None:
            result = train(cfg, loader, None, device="cpu")
            return result.steps * cfg.batch_size / result.seconds, 0
        settings = base.model_copy(update={"task_progress_interval_seconds": interval})
        lease = _Lease(settings, task_id, "bench")
        lease.coverage_n = cfg.grid.n
        writes = 0
        original = service.heartbeat

        def timed(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            began, began_cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                write_seconds.append(time.perf_counter() - began)
                write_cpu_seconds.append(time.thread_time() - began_cpu)
                writes += 1

        service.heartbeat = timed  # counts the writes the lease makes (the real function runs)
        try:
            with lease:  # its thread writes, as in the worker
                result = train(cfg, loader, None, device="cpu", on_progress=lease.on_progress)
        finally:
            service.heartbeat = original
        return result.steps * cfg.batch_size / result.seconds, writes

    run(None)  # warm-up: first-touch allocations and lazy imports
    rates: dict[str, list[float]] = {"none": [], "every_step": [], "default_interval": []}
    writes: dict[str, int] = {}
    for _ in range(repeats):
        for name, interval in (("none", None), ("every_step", 0.0), ("default_interval", default_interval)):
            rate, count = run(interval)
            rates[name].append(rate)
            writes[name] = count
    with session_scope(base) as session:
        sampled = (session.scalar(select(Task.patch_coverage).where(Task.id == task_id)) or {}).get("sampled")
    median = {name: statistics.median(values) for name, values in rates.items()}
    step_seconds = cfg.batch_size / median["none"]
    write_ms = statistics.median(write_seconds) * 1000 if write_seconds else 0.0
    write_cpu_ms = statistics.median(write_cpu_seconds) * 1000 if write_cpu_seconds else 0.0
    # Writes per second at the default interval: at most one per interval, and never more than
    # one per training step.
    writes_per_s = min(1 / default_interval, 1 / step_seconds)
    return {
        "config": {
            "steps": steps,
            "batch_size": cfg.batch_size,
            "image_size": 64,
            "grid": cfg.grid.n,
            "default_interval_s": default_interval,
            "repeats": repeats,
            "database": "sqlite",
        },
        "images_per_s_median": {k: round(v, 2) for k, v in median.items()},
        "images_per_s_all": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
        "slowdown_percent": {
            k: round(100 * (1 - median[k] / median["none"]), 2) for k in ("every_step", "default_interval")
        },
        "writes_per_run": writes,
        "write_ms_median": round(write_ms, 2),
        "write_ms_p99": round(sorted(write_seconds)[int(0.99 * (len(write_seconds) - 1))] * 1000, 2)
        if write_seconds
        else 0,
        "write_cpu_ms_median": round(write_cpu_ms, 3),
        "write_cpu_ms_p99": round(_p99(write_cpu_seconds) * 1000, 3),
        "step_ms": round(step_seconds * 1000, 1),
        "cost_at_default_interval_percent": round(100 * (write_ms / 1000) / default_interval, 3),
        "writes_per_s_at_default_interval": round(writes_per_s, 3),
        "writer_cpu_share_percent": round(100 * writes_per_s * write_cpu_ms / 1000, 3),
        # The bound whatever the step time: one write per interval at most.
        "writer_cpu_share_bound_percent": round(100 * (write_cpu_ms / 1000) / default_interval, 3),
        "writer_cpu_share_bound_p99_percent": round(100 * _p99(write_cpu_seconds) / default_interval, 3),
        "coverage_sampled_last_write": sampled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_dbs = ["sqlite"] + (["postgres"] if os.environ.get("TEST_DATABASE_URL") else [])
    parser.add_argument("--db", action="append", choices=["sqlite", "postgres"], help="repeatable")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_DATABASE_URL", ""))
    parser.add_argument("--broker-url", default=None, help="default: serve's SQLite broker")
    parser.add_argument("--port", type=int, default=18170)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--claims", type=int, default=5)
    parser.add_argument("--no-sse", dest="sse", action="store_false", help="skip the SSE comparison")
    parser.add_argument("--progress-repeats", type=int, default=3)
    parser.add_argument("--progress-steps", type=int, default=20)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--only-progress", action="store_true", help="only the progress-write part")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    kinds = args.db or default_dbs
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    if args.only_progress:
        out = {
            "machine": machine,
            "load_average_at_start": load,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "progress_writes": progress_writes(args.progress_repeats, args.progress_steps),
        }
        path = RESULTS / f"training_live_progress{args.tag}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        print(f"  wrote {path.relative_to(REPO_ROOT)}", flush=True)
        return
    for kind in kinds:
        print(f"== {kind}", flush=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def one(url: str) -> dict[str, Any]:
            with served(url, args.port, args.broker_url) as base_url:
                pid = _serve_pid(args.port)
                return asyncio.run(scenarios(base_url, args, pid))

        if kind == "sqlite":
            result = one("")
        else:
            with postgres_database(args.postgres_url) as url:
                result = one(url)
        if kind == "sqlite" and args.progress:
            result["progress_writes"] = progress_writes(args.progress_repeats, args.progress_steps)
        out = {
            "database": kind,
            "broker": args.broker_url or "sqlite (serve's default)",
            "config": {"clients": args.clients, "duration": args.duration, "claims": args.claims},
            "machine": machine,
            "load_average_at_start": load,
            "when": started,
            **result,
        }
        path = RESULTS / f"training_live_{kind}{args.tag}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        print(f"  wrote {path.relative_to(REPO_ROOT)}", flush=True)


def _serve_pid(port: int) -> int:
    """The `serve` process listening through its uvicorn child on ``port``."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "backend.cli import app" not in cmdline or "serve" not in cmdline:
            continue
        try:
            if process.environ().get("TESSERA_PORT") == str(port):
                return process.pid
        except psutil.Error:
            continue
    raise RuntimeError("serve's process not found")


if __name__ == "__main__":
    main()
