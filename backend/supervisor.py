"""`tessera serve`: the one-command laptop setup.

Prepares the data folder, migrates the database, creates the first admin, then runs the web
server, two Celery workers (one for training runs, one for the light and default queues, so a
plan or the reaper never waits behind a training) and Celery beat when a periodic task is
scheduled, as child processes until Ctrl-C or SIGTERM. If any child dies, the others are stopped too, so the
platform is never left half up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from backend.accounts.users import ensure_first_admin
from backend.config import Settings
from backend.db import session_scope, upgrade_database
from backend.errors import AppError
from backend.queue import DEFAULT_QUEUE, LIGHT_QUEUE, TRAINING_QUEUE
from worker.celery_app import celery_app

#: Seconds the children get to finish after a stop request before they are killed.
SHUTDOWN_TIMEOUT_SECONDS = 30.0
#: Seconds uvicorn waits for open connections (live progress views) before it closes them.
WEB_GRACEFUL_SHUTDOWN_SECONDS = 10
#: How often the supervisor checks that its children are still alive.
POLL_INTERVAL_SECONDS = 0.2

_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    signalled: bool = field(default=False)


def web_command(settings: Settings) -> list[str]:
    """The uvicorn command line that serves the API and the web UI."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "backend.main:create_app",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--log-level",
        settings.log_level.lower(),
        "--timeout-graceful-shutdown",
        str(WEB_GRACEFUL_SHUTDOWN_SECONDS),
        # The app logs every request itself (structured, with a request id).
        "--no-access-log",
    ]


#: Every queue: what one worker reads when it is the only one (`tessera worker`, the compose worker).
ALL_QUEUES = (DEFAULT_QUEUE, LIGHT_QUEUE, TRAINING_QUEUE)
#: What `serve`'s light worker reads: plans, validations, measurements, the reaper and re-dispatcher.
LIGHT_QUEUES = (DEFAULT_QUEUE, LIGHT_QUEUE)
#: What `serve`'s training worker reads: training runs only, one at a time.
TRAINING_QUEUES = (TRAINING_QUEUE,)


def worker_command(
    settings: Settings,
    queues: tuple[str, ...] = ALL_QUEUES,
    *,
    concurrency: int | None = None,
    name: str = "tessera",
) -> list[str]:
    """The Celery worker command line for ``queues`` (default: every queue).

    Prefork even at concurrency 1: each task runs in a child process, so a crash in native code
    (CUDA, an image decoder) takes down only that child and Celery hands the message back.
    Prefetch is one message per process and messages are acknowledged late (the Celery app's
    settings), so a training worker never holds a second training while it runs one.
    """
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        settings.log_level.upper(),
        "--hostname",
        f"{name}@%h",
        "--queues",
        ",".join(queues),
    ]


def training_worker_command(settings: Settings) -> list[str]:
    """`serve`'s training worker: the training queue alone, ``worker_concurrency`` runs at a time."""
    return worker_command(settings, TRAINING_QUEUES, name="tessera-training")


def light_worker_command(settings: Settings) -> list[str]:
    """`serve`'s light worker: the default and light queues (plans, validations, measurements,
    exports, the reaper), so none of them waits behind a training run."""
    return worker_command(
        settings, LIGHT_QUEUES, concurrency=settings.light_worker_concurrency, name="tessera-light"
    )


def beat_command(settings: Settings) -> list[str]:
    """The Celery beat command line (periodic tasks); its state file lives in the data dir."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "beat",
        "--loglevel",
        settings.log_level.upper(),
        "--schedule",
        str(settings.data_dir / "celerybeat-schedule"),
    ]


def child_commands(settings: Settings, *, with_beat: bool) -> dict[str, list[str]]:
    """Every process `serve` starts, by a name used in its messages."""
    commands = {
        "web server": web_command(settings),
        "training worker": training_worker_command(settings),
        "light worker": light_worker_command(settings),
    }
    if with_beat:
        commands["scheduler"] = beat_command(settings)
    return commands


def child_environment(settings: Settings) -> dict[str, str]:
    """The environment of the children: ours, plus the resolved locations.

    The resolved data dir and connection strings are passed explicitly so that every child
    uses exactly the database and broker the supervisor just migrated, whatever their cwd.
    """
    env = dict(os.environ)
    env["TESSERA_DATA_DIR"] = str(settings.data_dir)
    env["TESSERA_DATABASE_URL"] = settings.database_url
    env["TESSERA_BROKER_URL"] = settings.broker_url
    # Logs reach the terminal (or a pipe) line by line, interleaved in the right order.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def banner(settings: Settings, admin_password: str | None) -> str:
    """The start-up message: where to open Tessera and how to log in."""
    url = f"http://{settings.host}:{settings.port}"
    rule = "=" * 64
    lines = [rule, f"  Tessera is starting at {url}"]
    if admin_password is None and settings.admin_password:
        # The first admin (if it was just created) got the configured password: never echo it.
        lines.append(f"  Log in as {settings.admin_username} with the TESSERA_ADMIN_PASSWORD you set.")
    elif admin_password is None:
        lines.append("  Log in with your existing account.")
    else:
        lines += [
            f"  Admin username: {settings.admin_username}",
            f"  Admin password: {admin_password}",
            "  (shown only once: change it after logging in)",
        ]
    lines += ["  Press Ctrl-C to stop.", rule]
    return "\n".join(lines)


def port_problem(host: str, port: int) -> str | None:
    """Why the web server could not listen on ``host:port``, or None when it can.

    Checked before migrating so that the most common first-run problem (another server on the
    port) gets a plain answer instead of a child's traceback.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # Same option uvicorn uses: a port left in TIME_WAIT by a previous run is fine.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return (
            f"cannot listen on {host}:{port} ({exc.strerror or exc}). Stop whatever uses it, "
            "or choose another address with TESSERA_HOST / TESSERA_PORT."
        )
    return None


def serve(settings: Settings) -> int:
    """Migrate, create the first admin, run web server + workers until stopped; return an exit code."""
    problem = port_problem(settings.host, settings.port)
    if problem:
        print(f"tessera: {problem}", file=sys.stderr, flush=True)
        return 1
    settings.ensure_data_dir()
    try:
        upgrade_database(settings)
        with session_scope(settings) as session:
            admin_password = ensure_first_admin(session, settings)
    except AppError as exc:
        print(
            f"tessera: cannot create the first admin: {exc.detail}\n"
            "Fix TESSERA_ADMIN_USERNAME / TESSERA_ADMIN_PASSWORD (unset the password to get one generated).",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except SQLAlchemyError as exc:
        database = make_url(settings.database_url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(
            f"tessera: cannot prepare the database {database}: {reason}\n"
            "Check TESSERA_DATABASE_URL (or DATABASE_URL) and that the database server is running.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if settings.demo_dataset_on_serve:
        _register_demo(settings)
    print(banner(settings, admin_password), flush=True)
    commands = child_commands(settings, with_beat=bool(celery_app.conf.beat_schedule))
    return supervise(commands, child_environment(settings))


def _register_demo(settings: Settings) -> None:
    """Give a newcomer a dataset to start with: the small UltraMNIST demo for the first user, when
    no dataset exists yet (its worker job builds and validates it in a few seconds)."""
    from backend.datasets.service import ensure_serve_demo

    try:
        with session_scope(settings) as session:
            demo = ensure_serve_demo(session, settings)
            demo_id = demo.id if demo else None
    except Exception as exc:  # a demo must never keep the platform from starting
        print(f"tessera: could not register the demo dataset: {exc}", file=sys.stderr, flush=True)
        return
    if demo_id is not None:
        print(
            f"tessera: registered the demo dataset {demo_id} (a worker builds and validates it).", flush=True
        )


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send SIGTERM to the child when the supervisor dies.

    Without it, a supervisor killed with SIGKILL would leave a web server holding the port.
    Returns None where the kernel offers no such request.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The supervisor may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _send(child: _Child, signum: int) -> None:
    child.signalled = True
    if child.process.poll() is None:
        # It may exit between poll() and the signal; then there is nothing left to stop.
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signum)


def supervise(
    commands: Mapping[str, list[str]],
    env: Mapping[str, str],
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS,
) -> int:
    """Run ``commands`` as children in one process group until a signal or a child's death.

    SIGINT and SIGTERM are forwarded once to each child (a second Ctrl-C is forwarded again,
    which makes Celery stop without waiting for running tasks). Children still alive after
    ``shutdown_timeout`` seconds are killed. Returns 0 when everything stopped cleanly on
    request, 1 when a child failed or had to be killed.
    """
    children: list[_Child] = []
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if not received:
            # os.write, not print: the handler may interrupt a print to the same stream.
            os.write(sys.stderr.fileno(), b"\ntessera: stopping (Ctrl-C again stops immediately)...\n")
        received.append(signum)
        for child in children:
            _send(child, signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    failure: str | None = None
    group = 0
    try:
        pre_exec = _die_with_parent(os.getpid())
        for name, command in commands.items():
            if received:
                break
            try:
                # Our own process group, not the terminal's: Ctrl-C reaches only the supervisor,
                # which forwards it exactly once (a second SIGINT would make Celery skip its
                # warm shutdown), and stragglers can be killed as one group.
                process = subprocess.Popen(
                    command, env=dict(env), stdin=subprocess.DEVNULL, process_group=group, preexec_fn=pre_exec
                )
            except (OSError, subprocess.SubprocessError) as exc:
                failure = f"could not start the {name}: {exc}"
                break
            children.append(_Child(name, process))
            group = group or process.pid

        while failure is None and not received:
            for child in children:
                code = child.process.poll()
                if code is not None:
                    failure = f"the {child.name} stopped unexpectedly ({_describe_exit(code)})"
                    break
            else:
                time.sleep(POLL_INTERVAL_SECONDS)

        if failure is not None:
            print(f"tessera: {failure}; stopping the rest.", file=sys.stderr, flush=True)
        stop_signal = received[-1] if received else signal.SIGTERM
        for child in children:
            if not child.signalled:
                _send(child, stop_signal)

        stragglers = _wait_all(children, shutdown_timeout)
        if stragglers:
            names = ", ".join(child.name for child in stragglers)
            print(
                f"tessera: {names} did not stop within {shutdown_timeout:.0f} s; killing.",
                file=sys.stderr,
                flush=True,
            )
        if group:
            # Also reaches grandchildren (Celery's pool processes) that outlived their parent.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for child in stragglers:
            child.process.wait()
        return 1 if failure is not None or stragglers else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(children: list[_Child], timeout: float) -> list[_Child]:
    """Wait up to ``timeout`` seconds in total for every child; return those still running."""
    deadline = time.monotonic() + timeout
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    return [child for child in children if child.process.poll() is None]
