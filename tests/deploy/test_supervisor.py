"""The `serve` supervisor with real child processes: signal forwarding, failure, stragglers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backend.config import Settings
from backend.supervisor import banner, child_commands, child_environment, serve

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs `supervise` in its own process (it installs signal handlers) with the commands given as
# a Python literal in argv[1]; prints the return code last.
DRIVER = textwrap.dedent(
    """
    import ast, sys
    from backend.supervisor import supervise
    commands = ast.literal_eval(sys.argv[1])
    timeout = float(sys.argv[2])
    print("RC", supervise(commands, dict(__import__("os").environ), shutdown_timeout=timeout), flush=True)
    """
)


def child(tmp_path: Path, name: str, body: str) -> list[str]:
    """A Python child that writes its pid to <name>.pid, then runs ``body``."""
    script = tmp_path / f"{name}.py"
    pid_file = tmp_path / f"{name}.pid"
    script.write_text(
        "import os, signal, sys, time, pathlib\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n" + textwrap.dedent(body)
    )
    return [sys.executable, str(script)]


GRACEFUL = """
    def stop(signum, frame):
        pathlib.Path(__file__).with_suffix(".stopped").write_text(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)
"""


def start_driver(commands: dict[str, list[str]], timeout: float = 10.0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, repr(commands), str(timeout)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_pids(tmp_path: Path, names: list[str], timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [tmp_path / f"{name}.pid" for name in names]
        if all(f.exists() and f.read_text() for f in files):
            return {name: int(f.read_text()) for name, f in zip(names, files, strict=True)}
        time.sleep(0.05)
    raise AssertionError(f"children {names} did not start within {timeout} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) but has finished.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def finish(driver: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str]:
    output, _ = driver.communicate(timeout=timeout)
    return driver.returncode, output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_is_forwarded_once_and_stop_is_clean(tmp_path: Path, signum: int) -> None:
    commands = {"web server": child(tmp_path, "web", GRACEFUL), "worker": child(tmp_path, "worker", GRACEFUL)}
    driver = start_driver(commands)
    pids = wait_for_pids(tmp_path, ["web", "worker"])

    driver.send_signal(signum)
    code, output = finish(driver)

    assert code == 0, output
    assert output.strip().splitlines()[-1] == "RC 0", output
    for name, pid in pids.items():
        assert (tmp_path / f"{name}.stopped").read_text() == signal.Signals(signum).name
        assert not alive(pid)


def test_children_share_one_process_group_apart_from_the_supervisor(tmp_path: Path) -> None:
    commands = {"web server": child(tmp_path, "web", GRACEFUL), "worker": child(tmp_path, "worker", GRACEFUL)}
    driver = start_driver(commands)
    pids = wait_for_pids(tmp_path, ["web", "worker"])
    try:
        groups = {os.getpgid(pid) for pid in pids.values()}
        assert groups == {pids["web"]}
        assert os.getpgid(driver.pid) != pids["web"]
    finally:
        driver.send_signal(signal.SIGTERM)
        finish(driver)


def test_a_dying_child_stops_the_others_with_an_error(tmp_path: Path) -> None:
    commands = {
        "web server": child(tmp_path, "web", GRACEFUL),
        "worker": child(tmp_path, "worker", "time.sleep(0.5)\nsys.exit(3)\n"),
    }
    driver = start_driver(commands)
    pids = wait_for_pids(tmp_path, ["web", "worker"])

    code, output = finish(driver)

    assert output.strip().splitlines()[-1] == "RC 1", output
    assert "the worker stopped unexpectedly (exit code 3)" in output
    assert (tmp_path / "web.stopped").read_text() == "SIGTERM"
    assert not alive(pids["web"])


def test_a_child_ignoring_the_stop_is_killed_after_the_timeout(tmp_path: Path) -> None:
    stubborn = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)\n"
    commands = {"web server": child(tmp_path, "web", GRACEFUL), "worker": child(tmp_path, "worker", stubborn)}
    driver = start_driver(commands, timeout=1.0)
    pids = wait_for_pids(tmp_path, ["web", "worker"])

    started = time.monotonic()
    driver.send_signal(signal.SIGTERM)
    code, output = finish(driver)

    assert time.monotonic() - started < 10
    assert output.strip().splitlines()[-1] == "RC 1", output
    assert "worker did not stop within 1 s; killing" in output
    assert not alive(pids["worker"])
    assert not alive(pids["web"])


def test_children_get_sigterm_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    commands = {"web server": child(tmp_path, "web", GRACEFUL), "worker": child(tmp_path, "worker", GRACEFUL)}
    driver = start_driver(commands)
    pids = wait_for_pids(tmp_path, ["web", "worker"])

    driver.kill()
    finish(driver)

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids.values())
    assert (tmp_path / "web.stopped").read_text() == "SIGTERM"


def test_commands_environment_and_banner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", port=8123, worker_concurrency=2)

    commands = child_commands(settings, with_beat=False)
    assert list(commands) == ["web server", "training worker", "light worker"]
    web = commands["web server"]
    assert web[:3] == [sys.executable, "-m", "uvicorn"]
    assert web[web.index("--port") + 1] == "8123"

    def option(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    # Trainings on a worker of their own, one message at a time per process; everything short
    # (plans, validations, the reaper) on another, so it never waits behind a training run.
    training, light = commands["training worker"], commands["light worker"]
    assert option(training, "--queues") == "tessera.training"
    assert option(training, "--concurrency") == "2"
    assert option(training, "--prefetch-multiplier") == "1"
    assert option(light, "--queues") == "celery,tessera.light"
    assert option(light, "--concurrency") == str(settings.light_worker_concurrency)
    assert option(training, "--hostname") != option(light, "--hostname")
    assert all(option(c, "--pool") == "prefork" for c in (training, light))
    assert "beat" in child_commands(settings, with_beat=True)["scheduler"]

    env = child_environment(settings)
    assert env["TESSERA_DATA_DIR"] == str(tmp_path.resolve())
    assert env["TESSERA_BROKER_URL"] == f"sqla+sqlite:///{tmp_path.resolve() / 'broker.db'}"
    # A child reading that environment resolves the same database and broker.
    for key in ("TESSERA_DATA_DIR", "TESSERA_DATABASE_URL", "TESSERA_BROKER_URL"):
        monkeypatch.setenv(key, env[key])
    in_child = Settings()
    assert (in_child.database_url, in_child.broker_url) == (settings.database_url, settings.broker_url)

    text = banner(settings, "s3cret-pass")
    assert "http://127.0.0.1:8123" in text
    assert "Admin password: s3cret-pass" in text
    assert "existing account" in banner(settings, None)
    assert "s3cret" not in banner(settings, None)
    configured = Settings(data_dir=tmp_path, admin_password="configured-secret")
    assert "TESSERA_ADMIN_PASSWORD" in banner(configured, None)
    assert "configured-secret" not in banner(configured, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_refuses_a_busy_port_before_touching_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        code = serve(Settings(data_dir=tmp_path, host="127.0.0.1", port=port))

    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "tessera.db").exists()


def test_serve_explains_an_unreachable_database_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 on localhost: nothing listens there, the connection is refused at once.
    url = "postgresql+psycopg://tessera:hunter2@127.0.0.1:1/tessera"
    code = serve(Settings(data_dir=tmp_path, database_url=url, port=free_port()))

    err = capsys.readouterr().err
    assert code == 1
    assert "cannot prepare the database postgresql+psycopg://tessera:***@127.0.0.1:1/tessera" in err
    assert "hunter2" not in err


def test_serve_rejects_an_unusable_configured_admin_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = serve(Settings(data_dir=tmp_path, admin_password="short", port=free_port()))

    assert code == 1
    assert "cannot create the first admin" in capsys.readouterr().err
