"""Backbones: the built-in catalog rows, uploads, and who may see or delete them.

Built-in rows (one per architecture of the engine's catalog, no owner, source ``builtin``) are
created lazily by the first request that lists or reads backbones: a new catalog entry appears
without a migration or a start-up hook, in every way Tessera is run (``serve``, compose, tests,
a database emptied by hand), and two first requests racing each other cannot create one twice
(``builtin_key`` is unique and the insert skips conflicts). Each built-in row gets a
``backbones.measure`` job that fills its parameter count and memory figures.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from backend.backbones.uploads import ReceivedUpload
from backend.config import Settings
from backend.db import run_after_commit
from backend.errors import Conflict, Forbidden, Invalid, NotFound
from backend.models import BACKBONE_NAME_MAX_LENGTH, Backbone, BackboneStatus, Task, User, utcnow
from backend.queue import BACKBONES_MEASURE, BACKBONES_VALIDATE, enqueue_after_commit
from backend.text import has_control_characters, without_control_characters
from worker.patchgd.catalog import list_backbones as catalog_names

#: Folder of the data dir that holds one folder per uploaded backbone.
BACKBONES_DIR = "backbones"
#: File name endings accepted for weights (kept equal to the engine's ``WEIGHTS_SUFFIXES``).
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: A built-in row still without memory figures this long after its measurement was requested
#: is requested again (the job was lost, or no worker was running); one without ImageNet
#: weights is looked at again at this pace.
MEASURE_RETRY_AFTER = timedelta(minutes=30)
SOURCE_BUILTIN = "builtin"
SOURCE_UPLOAD = "upload"


def backbone_dir(settings: Settings, backbone_id: int) -> Path:
    """The folder of one uploaded backbone's files."""
    return settings.data_dir / BACKBONES_DIR / str(backbone_id)


def _needs_measuring(row: Backbone) -> bool:
    """True when a built-in row should get a ``backbones.measure`` job now.

    Not measured yet (never, or the last try failed): yes, unless a job was requested less than
    :data:`MEASURE_RETRY_AFTER` ago. Measured but without ImageNet weights: yes again at that
    pace, so that a file copied into the worker's torch cache is picked up (the job then only
    looks for it; it measures once).
    """
    details = row.details or {}
    requested = details.get("measure_requested_at")
    if requested:
        try:
            if utcnow() - datetime.fromisoformat(requested) < MEASURE_RETRY_AFTER:
                return False
        except ValueError:
            pass
    if "memory" not in details:
        return True
    return details.get("weights") == "random"


def _insert_ignoring_duplicates(session: Session) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the session's database (SQLite or Postgres)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(Backbone)
    return sqlite.insert(Backbone)


def ensure_builtins(session: Session, settings: Settings) -> None:
    """Create the catalog's missing built-in rows and request the measurements that are due.

    A row another request inserts at the same moment is skipped by the database (the unique
    ``builtin_key``), so racing first requests create each row once. Measurement jobs are sent
    after the commit.
    """
    existing = set(session.scalars(select(Backbone.builtin_key).where(Backbone.builtin_key.is_not(None))))
    missing = [name for name in catalog_names() if name not in existing]
    if missing:
        statement = _insert_ignoring_duplicates(session).values(
            [
                {
                    "owner_id": None,
                    "name": name,
                    "architecture": name,
                    "builtin_key": name,
                    "source": SOURCE_BUILTIN,
                    "status": BackboneStatus.READY,
                    "original_filename": "",
                    "weights_path": "",
                    "size_bytes": 0,
                    "sha256": "",
                    "param_count": 0,
                    "details": {},
                    "problems": [],
                    "error": "",
                    "created_at": utcnow(),
                }
                for name in missing
            ]
        )
        session.execute(statement.on_conflict_do_nothing(index_elements=["builtin_key"]))
    due = []
    for row in session.scalars(
        select(Backbone).where(Backbone.builtin_key.is_not(None)).order_by(Backbone.id)
    ):
        if _needs_measuring(row):
            row.details = {**(row.details or {}), "measure_requested_at": utcnow().isoformat()}
            due.append(row.id)
    if due:
        # One job measures them one after the other (each hands the rest on): a first start's
        # eight measurements then hold one light-queue slot, not all of them, and a user's plan or
        # prediction does not wait behind minutes of background measuring.
        enqueue_after_commit(session, settings, BACKBONES_MEASURE, due[0], due[1:])
    session.flush()


def list_visible(session: Session, user: User) -> list[Backbone]:
    """Built-in backbones (in catalog order), then the user's own uploads, newest first."""
    order = {name: i for i, name in enumerate(catalog_names())}
    builtins = sorted(
        session.scalars(select(Backbone).where(Backbone.owner_id.is_(None))),
        key=lambda row: order.get(row.architecture, len(order)),
    )
    uploads = session.scalars(
        select(Backbone).where(Backbone.owner_id == user.id).order_by(Backbone.id.desc())
    ).all()
    return [*builtins, *uploads]


def get_visible(session: Session, user: User, backbone_id: int) -> Backbone:
    """A built-in backbone or one of the user's own; anyone else's is "not found"."""
    row = session.get(Backbone, backbone_id)
    if row is None or (row.owner_id is not None and row.owner_id != user.id):
        raise NotFound("There is no backbone with this id.")
    return row


def builtin_for(session: Session, architecture: str) -> Backbone | None:
    """The built-in row of an architecture (its memory figures hold for uploads of it too)."""
    return session.scalars(select(Backbone).where(Backbone.builtin_key == architecture)).first()


def _clean_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise Invalid("Give the backbone a name.")
    if len(name) > BACKBONE_NAME_MAX_LENGTH:
        raise Invalid(f"The name is longer than {BACKBONE_NAME_MAX_LENGTH} characters.")
    if has_control_characters(name):
        raise Invalid("The name cannot contain control characters.")
    return name


def check_upload_fields(name: str, architecture: str, filename: str) -> tuple[str, str]:
    """The cleaned name and the architecture, or :class:`Invalid` saying what to fix."""
    clean = _clean_name(name)
    if architecture not in catalog_names():
        raise Invalid(f"Unknown architecture {architecture!r}: choose one of {', '.join(catalog_names())}.")
    if not filename.lower().endswith(WEIGHTS_SUFFIXES):
        raise Invalid(
            f"{filename or 'The file'} is not a weights file Tessera reads: upload a .safetensors file or "
            "a PyTorch state dict (.pt, .pth, .bin) saved with torch.save(model.state_dict(), ...)."
        )
    return clean, architecture


def create_upload(session: Session, settings: Settings, user: User, received: ReceivedUpload) -> Backbone:
    """Record an upload as ``validating``, keep its file, and send ``backbones.validate`` after commit.

    The temporary file is moved into the backbone's folder; on a refused form it is removed.
    """
    assert received.path is not None
    try:
        name, architecture = check_upload_fields(
            received.fields.get("name", ""), received.fields.get("architecture", ""), received.filename
        )
    except Invalid:
        received.discard()
        raise
    suffix = next(s for s in WEIGHTS_SUFFIXES if received.filename.lower().endswith(s))
    row = Backbone(
        owner_id=user.id,
        name=name,
        architecture=architecture,
        source=SOURCE_UPLOAD,
        status=BackboneStatus.VALIDATING,
        original_filename=without_control_characters(received.filename)[-255:],
        size_bytes=received.size,
        sha256=received.sha256,
        details={},
        problems=[],
    )
    session.add(row)
    session.flush()
    folder = backbone_dir(settings, row.id)
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / f"upload{suffix}"
    received.path.replace(stored)
    row.weights_path = str(stored.relative_to(settings.data_dir))
    session.flush()
    enqueue_after_commit(session, settings, BACKBONES_VALIDATE, row.id)
    return row


def backbone_in_use(session: Session, row: Backbone) -> bool:
    """True when a training task uses ``row`` (then it must not be deleted)."""
    return session.scalar(select(Task.id).where(Task.backbone_id == row.id).limit(1)) is not None


def delete_backbone(session: Session, settings: Settings, user: User, backbone_id: int) -> None:
    """Delete one of the user's uploads and, after the commit, its files; built-ins stay."""
    row = get_visible(session, user, backbone_id)
    if row.owner_id is None:
        raise Forbidden("Built-in backbones belong to the catalog and cannot be deleted.")
    if backbone_in_use(session, row):
        raise Conflict(
            f"Backbone {row.name!r} is used by a training task: delete the tasks that use it first."
        )
    folder = backbone_dir(settings, row.id)
    session.delete(row)
    session.flush()
    run_after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def memory_by_architecture(session: Session) -> dict[str, dict[str, Any]]:
    """The measured memory figures of every architecture, from the built-in rows (one query)."""
    rows = session.scalars(select(Backbone).where(Backbone.builtin_key.is_not(None)))
    return {row.architecture: row.details["memory"] for row in rows if "memory" in (row.details or {})}


def memory_of(session: Session, row: Backbone) -> dict[str, Any] | None:
    """The memory figures of the row's architecture (measured on its built-in row), if measured."""
    source = row if row.owner_id is None else builtin_for(session, row.architecture)
    if source is None:
        return None
    return (source.details or {}).get("memory")
