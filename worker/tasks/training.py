"""Training jobs: planning a run under a memory budget, on the worker that will train it.

The task names come from ``backend.queue`` (the web process sends by them); the engine is
imported inside the task bodies, so importing this module stays torch-free.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from backend.config import get_settings
from backend.queue import MEMORY_PLAN
from worker.celery_app import celery_app

#: Subfolder of the data dir where plans are written (Celery results are switched off).
PLAN_DIR = "memory_plans"
#: Calibration cache shared by every plan made on this data dir.
CALIBRATION_FILE = "memory_calibration.json"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def plan_report_path(data_dir: Path, token: str) -> Path:
    """Where the plan requested under ``token`` is written (and read back)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"Invalid plan token {token!r}: use 1 to 64 letters, digits, '-' or '_'.")
    return data_dir / PLAN_DIR / f"{token}.json"


@celery_app.task(name=MEMORY_PLAN)
def plan_memory(
    token: str,
    algorithm: str,
    config: dict[str, Any],
    budget_gib: float,
    streamed: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Choose settings for `config` (hyperparameters of `algorithm`, ``patchgd`` or
    ``baseline``) that fit `budget_gib`, verified by a measured trial on this worker.

    Writes ``{token, algorithm, fits, batch_size, patches_per_step, image_size, predicted_bytes,
    measured_bytes, reason, plan}`` to ``<data_dir>/memory_plans/<token>.json`` and returns it.
    The measured trial runs in a child interpreter, which works inside prefork pool processes.
    """
    import torch

    from worker.patchgd.config import config_from_dict
    from worker.patchgd.memory import plan

    settings = get_settings()
    path = plan_report_path(settings.data_dir, token)
    cfg = config_from_dict(algorithm, config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = plan(
        cfg,
        budget_gib,
        device,
        streamed=streamed,
        cache_file=settings.data_dir / CALIBRATION_FILE,
    )
    report: dict[str, Any] = {
        "token": token,
        "pid": os.getpid(),
        "device": device,
        "algorithm": result.algorithm,
        "fits": result.fits,
        "batch_size": result.batch_size,
        "patches_per_step": result.patches_per_step,
        "image_size": result.image_size,
        "predicted_bytes": result.predicted_bytes,
        "measured_bytes": result.measured_bytes,
        "reason": result.reason,
        "plan": result.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(report), encoding="utf-8")
    os.replace(partial, path)
    return report
