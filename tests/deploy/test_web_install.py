"""The web install (``pip install -e .``, no extras, as in the ``api`` image) can talk to a Redis broker.

Grepping the Dockerfile cannot catch a transport whose imports are not declared: this builds a
fresh virtual environment with only the base dependencies and connects from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_SECONDS = 600

pytestmark = pytest.mark.slow

# Runs inside the fresh environment: the web process's own health check, then a message round trip.
_CHECK = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    import kombu.transport.redis  # noqa: F401 (fails when the transport's imports are not installed)
    from kombu import Connection
    from backend.config import Settings
    from backend.queue import broker_reachable

    url, queue_name, data_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    assert broker_reachable(Settings(broker_url=url, data_dir=data_dir), timeout=5.0), "broker unreachable"
    with Connection(url, connect_timeout=5) as conn:
        queue = conn.SimpleQueue(queue_name)
        queue.put({"hello": "tessera"})
        message = queue.get(timeout=5)
        assert message.payload == {"hello": "tessera"}, message.payload
        message.ack()
        queue.queue.delete()
        queue.close()
    print("redis-ok")
    """
)


def test_base_install_reaches_redis(tmp_path: Path) -> None:
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("TEST_REDIS_URL is not set: no Redis to connect to")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Only what the api image has: the environment must not see the test runner's packages.
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO_ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    check = subprocess.run(
        [
            str(python),
            "-c",
            _CHECK,
            redis_url,
            f"tessera.install-check.{uuid.uuid4().hex[:8]}",
            str(tmp_path),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and "redis-ok" in check.stdout, check.stdout + check.stderr
