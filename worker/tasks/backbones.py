"""Backbone jobs: validating an uploaded weights file, and measuring a built-in architecture.

Both run on the light queue and are thin: the engine (``worker.patchgd.backbones``) inspects,
normalises and checks the file, or measures the architecture; these jobs move the row.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import update

from backend.config import get_settings
from backend.db import session_scope
from backend.models import Backbone, BackboneStatus, utcnow
from backend.queue import BACKBONES_MEASURE, BACKBONES_VALIDATE, enqueue
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)

#: Name of the checked trunk weights in a backbone's folder (what training loads).
CHECKED_WEIGHTS = "weights.safetensors"


@celery_app.task(name=BACKBONES_VALIDATE)
def validate(backbone_id: int) -> str:
    """Check an upload: refuse what is not plain weights, strict-load it, one forward pass on CPU.

    ``ready`` rows point at the normalised ``weights.safetensors`` (prefixes stripped, head
    dropped) and the uploaded file is removed; ``invalid`` rows say why, with the first
    mismatches. A row deleted meanwhile is left alone and its folder removed.
    """
    from worker.patchgd.backbones import WeightsMismatch, check_weights
    from worker.patchgd.errors import WeightsError

    settings = get_settings()
    with session_scope(settings) as session:
        row = session.get(Backbone, backbone_id)
        if row is None or row.status != BackboneStatus.VALIDATING or not row.weights_path:
            return "skipped"
        architecture, uploaded = row.architecture, settings.data_dir / row.weights_path
    dest = uploaded.parent / CHECKED_WEIGHTS
    values: dict[str, object]
    try:
        checked = check_weights(architecture, uploaded, dest)
    except WeightsError as exc:
        problems = exc.problems if isinstance(exc, WeightsMismatch) else []
        message = str(exc)
        values = {
            "status": BackboneStatus.INVALID,
            "error": message[:1].upper() + message[1:],
            "problems": problems,
        }
    except Exception as exc:  # a bug or a broken environment: the user sees it was not their file
        logger.exception("validation of backbone %s failed", backbone_id)
        values = {
            "status": BackboneStatus.INVALID,
            "error": f"Validation failed inside Tessera ({type(exc).__name__}); it has been logged.",
            "problems": [],
        }
    else:
        values = {
            "status": BackboneStatus.READY,
            "weights_path": str(dest.relative_to(settings.data_dir)),
            "param_count": checked.param_count,
            "details": checked.details,
            "problems": [],
            "error": "",
        }
    uploaded.unlink(missing_ok=True)
    with session_scope(settings) as session:
        moved = session.execute(
            update(Backbone)
            .where(Backbone.id == backbone_id, Backbone.status == BackboneStatus.VALIDATING)
            .values(**values, validated_at=utcnow())
        ).rowcount
    if not moved:
        # Deleted (or finished by another delivery) while we worked: leave no orphaned files.
        with session_scope(settings) as session:
            if session.get(Backbone, backbone_id) is None:
                shutil.rmtree(uploaded.parent, ignore_errors=True)
        return "skipped"
    return str(values["status"])


def _measure_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@celery_app.task(name=BACKBONES_MEASURE)
def measure(backbone_id: int, then: list[int] | None = None) -> str:
    """Fill a built-in row: parameter count and memory per megapixel (once), and whether
    torchvision's ImageNet weights are in this worker's torch cache (every time); then hand the
    ids in ``then`` on to the next job, so the built-ins are measured one at a time."""
    try:
        return _measure(backbone_id)
    finally:
        if then:
            enqueue(get_settings(), BACKBONES_MEASURE, then[0], then[1:])


def _measure(backbone_id: int) -> str:
    from worker.patchgd.backbones import check_weights, describe_architecture, imagenet_weights

    settings = get_settings()
    with session_scope(settings) as session:
        row = session.get(Backbone, backbone_id)
        if row is None or row.owner_id is not None:
            return "skipped"
        architecture = row.architecture
        measured = "memory" in (row.details or {})
    details: dict[str, object] = {}
    param_count = 0
    if not measured:  # measured once; later jobs only look for ImageNet weights again
        try:
            described = describe_architecture(architecture, device=_measure_device())
            param_count = int(described["param_count"])
            details["memory"] = described["memory"]
        except Exception as exc:  # shown on the page instead of "measuring…" forever
            logger.exception("measuring backbone %s failed", architecture)
            details["measure_error"] = f"{type(exc).__name__}: {exc}"
    imagenet = imagenet_weights(architecture)
    weights_path = ""
    if imagenet["present"]:
        # A cached file is used only if it passes the same checks as an upload.
        checked_dir = settings.data_dir / "backbones" / "imagenet"
        try:
            check_weights(
                architecture, Path(str(imagenet["path"])), checked_dir / f"{architecture}.safetensors"
            )
            weights_path = str((checked_dir / f"{architecture}.safetensors").relative_to(settings.data_dir))
        except Exception as exc:
            imagenet["error"] = str(exc)
    details["imagenet"] = imagenet
    details["weights"] = "imagenet" if weights_path else "random"
    with session_scope(settings) as session:
        row = session.get(Backbone, backbone_id)
        if row is None:
            return "skipped"
        previous = {k: v for k, v in (row.details or {}).items() if k != "measure_error"}
        row.details = {**previous, **details}
        row.weights_path = weights_path
        if param_count:
            row.param_count = param_count
        row.validated_at = utcnow()
    if measured:
        return "checked"
    return "measured" if "memory" in details else "failed"
