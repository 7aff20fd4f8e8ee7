"""The two import boundaries of the architecture, checked in fresh interpreters.

The web process never imports torch (it stays small and fast and can run without the worker
extra); the PatchGD engine never imports the web, database or queue stack (it can be tested,
benchmarked and reused alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """Run `code` in a new interpreter and return the top-level packages it ended up importing."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    env = {**os.environ, "TESSERA_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_web_process_and_worker_entry_points_do_not_import_torch(tmp_path: Path) -> None:
    modules = _modules_after(
        "from backend.main import create_app\n"
        "from fastapi.testclient import TestClient\n"
        "import importlib, backend.cli, worker.celery_app\n"
        "for name in worker.celery_app.TASK_MODULES:\n"
        "    importlib.import_module(name)\n"
        "with TestClient(create_app()) as client:\n"
        "    assert client.get('/login').status_code == 200\n"
        "    assert client.get('/openapi.json').status_code == 200\n",
        tmp_path,
    )
    assert "fastapi" in modules  # the app really was built
    assert not modules & {"torch", "torchvision", "numpy", "PIL", "tifffile", "openslide"}


def test_engine_does_not_import_web_database_or_queue(tmp_path: Path) -> None:
    engine_modules = sorted(
        p.stem for p in (ROOT / "worker" / "patchgd").glob("*.py") if p.stem != "__init__"
    )
    imports = "\n".join(f"import worker.patchgd.{name}" for name in engine_modules)
    modules = _modules_after(imports, tmp_path)
    assert "torch" in modules  # the engine really was imported
    assert not modules & {"backend", "fastapi", "starlette", "sqlalchemy", "celery", "kombu", "alembic"}


def test_import_contracts_hold_and_make_test_checks_them() -> None:
    """The architecture's boundaries (pyproject's import-linter contracts) hold, and `make test` runs them."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    test_target = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "lint-imports" in test_target


def test_web_process_validates_task_config_with_the_engine_rules_without_torch(tmp_path: Path) -> None:
    """The engine's config module (its rules, backbone list and errors) loads without torch."""
    modules = _modules_after(
        "import backend.main\n"
        "from worker.patchgd.config import ConfigError, config_from_dict, list_backbones\n"
        "from worker.patchgd.errors import EngineError\n"
        "cfg = config_from_dict('patchgd', {'num_classes': 3, 'backbone': 'resnet18', 'image_size': 256,\n"
        "                                   'patch_size': 64, 'patches_per_step': 4})\n"
        "assert (cfg.n, cfg.num_patches, cfg.k, cfg.num_inner_iterations) == (4, 16, 4, 4), cfg\n"
        "assert 'resnet50' in list_backbones()\n"
        "for bad, message in [\n"
        "    ({'num_classes': 3, 'image_size': 250, 'patch_size': 64},\n"
        "     'image_size 250 is not a multiple of patch_size 64'),\n"
        "    ({'num_classes': 3, 'backbone': 'vgg99'}, \"unknown backbone 'vgg99'; choose one of\"),\n"
        "    ({'num_classes': 3, 'image_size': 256, 'patch_size': 64, 'patches_per_step': 17},\n"
        "     'patches_per_step 17 is more than the 16 patches of a 4x4 grid'),\n"
        "]:\n"
        "    try:\n"
        "        config_from_dict('patchgd', bad)\n"
        "    except ConfigError as exc:\n"
        "        assert isinstance(exc, EngineError) and message in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(f'{bad} was accepted')\n",
        tmp_path,
    )
    assert "fastapi" in modules and "worker" in modules  # both really were imported
    assert not modules & {"torch", "torchvision", "numpy", "PIL", "tifffile", "sklearn"}
