"""The CI entry point: valid bash, executable, strict, and running the README's test command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CI_RUN = REPO_ROOT / ".ci" / "run"


def test_ci_script_is_strict_executable_bash_that_runs_make_test() -> None:
    assert os.access(CI_RUN, os.X_OK)
    subprocess.run(["bash", "-n", str(CI_RUN)], check=True)
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert text.rstrip().splitlines()[-1] == "make test"
    assert "make test" in (REPO_ROOT / "README.md").read_text()
    for variable in ("TEST_DATABASE_URL=postgresql+psycopg://", "TEST_REDIS_URL=redis://"):
        assert f"export {variable}" in text
