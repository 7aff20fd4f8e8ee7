"""A ready dataset and a built-in backbone for the training tests, made in the test.

The dataset goes the way users' datasets go: uploaded through the API, then validated by the
real validation job (run here, in the test process); the backbone is the built-in row the
catalog creates, inserted directly so that no measurement job is queued.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from backend.config import Settings
from backend.db import session_scope
from backend.models import Backbone, BackboneStatus
from backend.models.base import utcnow
from tests.datasets_worker.builders import image_bytes
from worker.patchgd.testing import level_colour, write_pyramidal_tiff
from worker.tasks.datasets import validate_dataset


def dataset_zip(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 8, size: int = 64) -> bytes:
    """A class-folder dataset of noisy ``size``² PNGs as zip bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for c, name in enumerate(classes):
            for i in range(per_class):
                archive.writestr(f"{name}/{i}.png", image_bytes("PNG", (size, size), seed=c * 100 + i))
    return buffer.getvalue()


def pyramid_zip(sizes: tuple[int, ...] = (256, 256), per_class: int = 3, mpp: float | None = 0.5) -> bytes:
    """A class-folder dataset of pyramidal TIFFs as zip bytes: class ``c`` holds ``per_class``
    TIFFs of ``sizes[c]``² in 64² tiles (256²: levels 256², 128², 64²; 128²: 128², 64²), level L
    painted grey 10 * (L + 1) (``level_colour``), with resolution tags of ``mpp`` µm/px at level 0."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(buffer, "w") as archive:
        for c, size in enumerate(sizes):
            path = write_pyramidal_tiff(
                Path(folder) / f"{c}.tif", size, tile=64, tile_fn=level_colour, mpp=mpp
            )
            for i in range(per_class):
                archive.writestr(f"class{c}/{i}.tif", path.read_bytes())
    return buffer.getvalue()


def ready_dataset(
    settings: Settings,
    client,
    headers: dict[str, str],
    name: str = "pets",
    archive: bytes | None = None,
    **kwargs,  # noqa: ANN001
) -> int:
    """Upload a dataset through the API (``archive``, else a ``dataset_zip``) and validate it with
    the real job; returns its id."""
    response = client.post(
        "/api/v1/datasets",
        data={"name": name},
        files={
            "file": (
                f"{name}.zip",
                archive if archive is not None else dataset_zip(**kwargs),
                "application/zip",
            )
        },
        headers=headers,
    )
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    assert validate_dataset(settings, dataset_id) == "ready"
    return dataset_id


def builtin_backbone(settings: Settings, architecture: str = "resnet18") -> int:
    """The built-in row of ``architecture`` (random init), ready; returns its id."""
    with session_scope(settings) as session:
        row = Backbone(
            owner_id=None,
            name=architecture,
            architecture=architecture,
            builtin_key=architecture,
            source="builtin",
            status=BackboneStatus.READY,
            details={"measure_requested_at": utcnow().isoformat()},
            problems=[],
        )
        session.add(row)
        session.flush()
        return row.id


#: A tiny PatchGD run: 64² images cut into 4 patches of 32², resnet18, CPU.
TINY_PATCHGD = {"image_size": 64, "patch_size": 32, "batch_size": 4, "epochs": 1, "warmup_epochs": 0}
#: The same as the full-image baseline.
TINY_BASELINE = {"image_size": 64, "batch_size": 4, "epochs": 1, "warmup_epochs": 0}
