"""Datasets: the rows, their folders, the owner's quota, and the worker's side of validation.

Everything a dataset owns lives under ``<data_dir>/datasets/<id>/``: the upload as sent
(``upload``), the extracted images (``images/``), thumbnails (``_thumbnails/<n>.jpg``) and the
validation report (``report.json``). Removing a dataset removes that folder, after the commit.

Services only ``flush()``; the request, the CLI or the worker owns the transaction. The worker's
progress and cancellation checks use short transactions of their own (:func:`record_progress`,
:func:`deletion_requested`), so the page sees progress while validation runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.datasets.levels import level_table
from backend.db import run_after_commit, run_after_rollback, session_scope
from backend.errors import AppError, Conflict, Forbidden, Invalid, NotFound
from backend.models import DATASET_NAME_MAX_LENGTH, Dataset, DatasetStatus, Task, User
from backend.models.base import utcnow
from backend.queue import DATASETS_DEMO, DATASETS_VALIDATE, enqueue_after_commit
from backend.text import has_control_characters, without_control_characters

DATASETS_DIR = "datasets"
UPLOAD_FILE = "upload"
REPORT_FILE = "report.json"
THUMBNAILS_DIR = "_thumbnails"
#: Longest import path (it is kept in ``original_filename``).
IMPORT_PATH_MAX_LENGTH = 255
#: Pyramids listed one by one in the summary (the report file has them all).
SUMMARY_MAX_PYRAMIDS = 50
#: ``Dataset.source`` of a dataset imported from under ``import_root``.
IMPORT_SOURCE = "import"


class UploadTooLarge(AppError):
    """The upload is over ``max_upload_bytes``."""

    status_code = 413
    code = "too_large"
    default_detail = "The upload is too large."


class QuotaExceeded(AppError):
    """The upload would take the owner's datasets over ``dataset_quota_bytes``."""

    status_code = 413
    code = "quota_exceeded"
    default_detail = "Your storage quota is used up."


class FormInvalid(AppError):
    """A field of the upload form is missing or not acceptable (the body itself parsed)."""

    status_code = 422
    code = "validation_error"
    default_detail = "The form is not valid."


def dataset_dir(settings: Settings, dataset_id: int) -> Path:
    """The folder of dataset ``dataset_id``: everything it owns is under it."""
    return settings.data_dir / DATASETS_DIR / str(int(dataset_id))


def upload_path(settings: Settings, dataset_id: int) -> Path:
    """Where the uploaded bytes of dataset ``dataset_id`` are written."""
    return dataset_dir(settings, dataset_id) / UPLOAD_FILE


def clean_name(name: str) -> str:
    """A dataset name, trimmed; 1 to ``DATASET_NAME_MAX_LENGTH`` characters, no control characters."""
    cleaned = " ".join(name.split())
    if not cleaned:
        raise FormInvalid("Give the dataset a name.")
    if len(cleaned) > DATASET_NAME_MAX_LENGTH:
        raise FormInvalid(f"The dataset name is longer than {DATASET_NAME_MAX_LENGTH} characters.")
    if has_control_characters(cleaned):
        raise FormInvalid("The dataset name cannot contain control characters.")
    return cleaned


def clean_filename(filename: str) -> str:
    """The last component of an uploaded file's name (a browser may send a whole path), at most 255."""
    return without_control_characters(filename.replace("\\", "/").rsplit("/", 1)[-1].strip()[-255:])


def storage_used(session: Session, owner_id: int, *, exclude_id: int | None = None) -> int:
    """Bytes of uploads the owner's datasets hold (what the quota counts). Imports from the
    server's import root are not counted: their files are already on the server's storage."""
    query = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        Dataset.owner_id == owner_id, Dataset.source != IMPORT_SOURCE
    )
    if exclude_id is not None:
        query = query.where(Dataset.id != exclude_id)
    return int(session.scalar(query) or 0)


def quota_message(settings: Settings, used: int) -> str:
    """The 413 message of an upload over the quota."""
    return (
        f"This upload would exceed your storage quota of {human_bytes(settings.dataset_quota_bytes)} "
        f"({human_bytes(used)} already used). Delete datasets you no longer need, or ask an "
        "administrator to raise TESSERA_DATASET_QUOTA_BYTES."
    )


def too_large_message(settings: Settings) -> str:
    """The 413 message of an upload over ``max_upload_bytes``."""
    return (
        f"The upload is larger than the {human_bytes(settings.max_upload_bytes)} accepted "
        "(TESSERA_MAX_UPLOAD_BYTES)."
    )


def check_upload_size(settings: Settings, used: int, size: int) -> None:
    """Raise 413 when ``size`` bytes are over the upload limit, or over the quota with ``used`` bytes."""
    if size > settings.max_upload_bytes:
        raise UploadTooLarge(too_large_message(settings), headers={"Connection": "close"})
    if used + size > settings.dataset_quota_bytes:
        raise QuotaExceeded(quota_message(settings, used), headers={"Connection": "close"})


def human_bytes(size: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def create_dataset(
    session: Session, settings: Settings, owner_id: int, name: str, filename: str, *, source: str = "upload"
) -> Dataset:
    """A new dataset row (status ``uploading``) and its empty folder; the bytes come next."""
    dataset = Dataset(
        owner_id=owner_id,
        name=clean_name(name),
        source=source,
        original_filename=clean_filename(filename),
        status=DatasetStatus.UPLOADING,
    )
    session.add(dataset)
    session.flush()
    folder = dataset_dir(settings, dataset.id)
    dataset.storage_path = folder.relative_to(settings.data_dir).as_posix()
    session.flush()
    return dataset


def finish_upload(session: Session, settings: Settings, dataset_id: int, size: int, sha256: str) -> Dataset:
    """Record the received upload, check the quota once more (against concurrent uploads), and
    enqueue ``datasets.validate`` after the commit."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.delete_requested:
        raise NotFound("The dataset was deleted while it was uploading.")
    check_upload_size(settings, storage_used(session, dataset.owner_id, exclude_id=dataset.id), size)
    dataset.size_bytes = size
    dataset.sha256 = sha256
    dataset.status = DatasetStatus.VALIDATING
    dataset.progress_phase = "queued"
    session.flush()
    enqueue_after_commit(session, settings, DATASETS_VALIDATE, dataset.id)
    return dataset


def discard_upload(settings: Settings, dataset_id: int) -> None:
    """Remove a failed upload: its row and its folder (own transaction; used when an upload fails)."""
    with session_scope(settings) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None and dataset.status == DatasetStatus.UPLOADING:
            session.delete(dataset)
    shutil.rmtree(dataset_dir(settings, dataset_id), ignore_errors=True)


# Import from a server folder (admins): the web process only stats and links, never reads images.


def import_root(settings: Settings) -> Path:
    """The resolved import root; 403 when imports are disabled (``import_root`` empty)."""
    if not settings.import_root.strip():
        raise Forbidden(
            "Importing from a server folder is disabled on this server: an administrator must set "
            "TESSERA_IMPORT_ROOT to the folder imports may come from."
        )
    root = Path(settings.import_root).expanduser().resolve()
    if not root.is_dir():
        raise Forbidden(
            f"The import root {str(root)!r} (TESSERA_IMPORT_ROOT) is not a folder on this server."
        )
    return root


def resolve_import_path(settings: Settings, relative: str) -> Path:
    """The real path of ``relative`` under the import root, which must be a regular file or a folder.

    Refused (400): an empty, absolute or over-long path, ``..`` components, control characters,
    and anything whose real path (links resolved) is outside the import root.
    """
    root = import_root(settings)
    if not relative or not relative.strip():
        raise Invalid("Give the path of a file or folder under the import root.")
    if has_control_characters(relative):
        raise Invalid("The import path cannot contain NUL or other control characters.")
    if len(relative) > IMPORT_PATH_MAX_LENGTH:
        raise Invalid(f"The import path is longer than {IMPORT_PATH_MAX_LENGTH} characters.")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith("\\") or "\\" in relative:
        raise Invalid("The import path must be relative to the import root (no leading '/', no '\\').")
    if ".." in pure.parts:
        raise Invalid("The import path cannot contain '..': give a path inside the import root.")
    if not pure.parts or pure.parts == (".",):
        raise Invalid("Give the path of a file or folder under the import root, not the root itself.")
    real = Path(os.path.realpath(root.joinpath(*pure.parts)))
    if real == root or not real.is_relative_to(root):
        raise Invalid(f"{relative!r} leads outside the import root (through a link): it cannot be imported.")
    try:
        info = real.stat()
    except OSError:
        raise Invalid(f"Nothing is at {relative!r} under the import root.") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise Invalid(f"{relative!r} is neither a regular file nor a folder.")
    return real


def import_dataset(
    session: Session, settings: Settings, admin: User, name: str, relative: str, owner: str | None = None
) -> Dataset:
    """Register a dataset from ``relative`` under the import root for ``owner`` (default: the admin).

    A file (archive, image or slide) is hard-linked as the dataset's ``upload`` (a copy where the
    filesystem refuses); a folder is hard-linked file by file by the worker. Either way the
    dataset is ``validating`` and ``datasets.validate`` is queued after the commit. Imports do
    not count against the owner's quota (:func:`storage_used`). Deleting the dataset removes
    only its own folder: the links, never the source.
    """
    owner_user = admin
    if owner is not None and owner != admin.username:
        found = session.scalar(select(User).where(User.username == owner))
        if found is None or not found.is_active:
            raise Invalid(f"No active user is called {owner!r}.")
        owner_user = found
    try:
        clean = clean_name(name)
    except FormInvalid as exc:  # a JSON body: 400, like every other refusal of this request
        raise Invalid(exc.detail) from None
    source = resolve_import_path(settings, relative)
    relative = PurePosixPath(relative).as_posix()
    info = source.stat()
    is_folder = stat.S_ISDIR(info.st_mode)
    dataset = create_dataset(session, settings, owner_user.id, clean, source.name, source=IMPORT_SOURCE)
    dataset.original_filename = relative
    imported: dict[str, Any] = {"kind": "folder" if is_folder else "file", "path": relative}
    folder = dataset_dir(settings, dataset.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not is_folder:
            imported["method"] = (
                "hard link" if link_or_copy(source, upload_path(settings, dataset.id)) else "copy"
            )
            dataset.size_bytes = info.st_size
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # Should the transaction not commit, the folder (links only) goes with it.
    run_after_rollback(session, lambda: shutil.rmtree(folder, ignore_errors=True))
    dataset.summary = {"import": imported}
    dataset.status = DatasetStatus.VALIDATING
    dataset.progress_phase = "queued"
    session.flush()
    enqueue_after_commit(session, settings, DATASETS_VALIDATE, dataset.id)
    return dataset


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` to ``target`` (no copy); copy when the filesystem refuses a link
    (another filesystem, ``EXDEV``; protected hard links, ``EPERM``). True when linked."""
    try:
        os.link(source, target, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK):
            raise
    shutil.copyfile(source, target, follow_symlinks=False)
    return False


def list_datasets(session: Session, user: User) -> Sequence[Dataset]:
    """The user's datasets, newest first (those being deleted are left out)."""
    return session.scalars(
        select(Dataset)
        .where(Dataset.owner_id == user.id, Dataset.delete_requested.is_(False))
        .order_by(Dataset.created_at.desc(), Dataset.id.desc())
    ).all()


def get_dataset(session: Session, user: User, dataset_id: int) -> Dataset:
    """The user's dataset ``dataset_id``; 404 for anyone else's (never say which)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner_id != user.id or dataset.delete_requested:
        raise NotFound("No such dataset.")
    return dataset


def dataset_in_use(session: Session, dataset: Dataset) -> bool:
    """True when a training task uses ``dataset`` (then it must not be deleted)."""
    return session.scalar(select(Task.id).where(Task.dataset_id == dataset.id).limit(1)) is not None


def delete_dataset(session: Session, settings: Settings, user: User, dataset_id: int) -> bool:
    """Delete the user's dataset; returns True when gone now, False when the validating worker will
    finish the job (it stops at its next check and removes row and files).

    A dataset a task uses is refused (409). Files are removed after the commit.
    """
    dataset = get_dataset(session, user, dataset_id)
    if dataset_in_use(session, dataset):
        raise Conflict(
            f"Dataset {dataset.name!r} is used by a training task: delete the tasks that train on it first."
        )
    if dataset.status == DatasetStatus.VALIDATING:
        dataset.delete_requested = True
        session.flush()
        return False
    folder = dataset_dir(settings, dataset.id)
    session.delete(dataset)
    session.flush()
    run_after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))
    return True


def thumbnail_file(settings: Settings, dataset: Dataset, index: int) -> Path:
    """The JPEG of thumbnail ``index`` of a ready dataset (404 when there is none)."""
    listed = {t.get("index") for t in (dataset.summary or {}).get("thumbnails", [])}
    path = dataset_dir(settings, dataset.id) / THUMBNAILS_DIR / f"{int(index)}.jpg"
    if dataset.status != DatasetStatus.READY or index not in listed or not path.is_file():
        raise NotFound("No such thumbnail.")
    return path


def prune_stale_uploads(session: Session, settings: Settings, now: datetime | None = None) -> list[int]:
    """Remove uploads that received nothing for ``stale_upload_hours`` (abandoned resumable uploads,
    multipart uploads cut off by a crash, demos no worker built): rows now, folders after the
    commit. Returns the ids removed."""
    cutoff = (now or utcnow()) - timedelta(hours=settings.stale_upload_hours)
    stale = session.scalars(
        select(Dataset).where(Dataset.status == DatasetStatus.UPLOADING, Dataset.updated_at < cutoff)
    ).all()
    removed = []
    for dataset in stale:
        removed.append(dataset.id)
        remove_dataset(session, settings, dataset.id)
    return removed


def touch_upload(session: Session, dataset_id: int, offset: int) -> None:
    """Record that a resumable upload received bytes (its offset, and so its ``updated_at``)."""
    session.execute(
        update(Dataset).where(Dataset.id == dataset_id).values(progress_done=offset, updated_at=utcnow())
    )


# Demo data: an UltraMNIST-style dataset built by a worker (the web process imports no numpy).

#: The small demo `serve` registers for the first user when no dataset exists yet (a few seconds).
SERVE_DEMO = {"canvas_size": 256, "count": 120, "seed": 0}


def register_demo(
    session: Session,
    settings: Settings,
    owner: User,
    *,
    canvas_size: int = 512,
    count: int = 600,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """A demo dataset row for ``owner``; the ``datasets.demo`` job writes its archive (UltraMNIST
    style: real MNIST digits of very different sizes on a large canvas, the label is the bucketed
    digit sum), then it is validated like any upload."""
    if canvas_size < 64 or count < 12:
        raise Invalid("The demo needs canvases of at least 64 px and at least 12 images.")
    dataset = create_dataset(
        session,
        settings,
        owner.id,
        name or f"UltraMNIST demo ({count} × {canvas_size}²)",
        "ultramnist-demo.tar",
        source="demo",
    )
    dataset.summary = {"demo": {"canvas_size": canvas_size, "count": count, "seed": seed}}
    dataset.progress_phase = "generating"
    session.flush()
    enqueue_after_commit(session, settings, DATASETS_DEMO, dataset.id)
    return dataset


def first_admin(session: Session) -> User | None:
    """The oldest active administrator (the default owner of demo data)."""
    from backend.models import Role

    return session.scalars(
        select(User).where(User.role == Role.ADMIN, User.is_active.is_(True)).order_by(User.id)
    ).first()


def ensure_serve_demo(session: Session, settings: Settings) -> Dataset | None:
    """Register the small demo for the first user when no dataset exists at all (``serve``)."""
    if session.scalar(select(func.count()).select_from(Dataset)):
        return None
    owner = session.scalars(select(User).where(User.is_active.is_(True)).order_by(User.id)).first()
    if owner is None:
        return None
    return register_demo(session, settings, owner, **SERVE_DEMO)


def demo_options(session: Session, dataset_id: int) -> dict[str, int] | None:
    """The options of a demo still to be built, or None (gone, deleted, or already built)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.delete_requested or dataset.status != DatasetStatus.UPLOADING:
        return None
    return dict((dataset.summary or {}).get("demo") or {}) or None


# The worker's side: claim, progress, cancellation, outcome.


def claim_for_validation(session: Session, dataset_id: int) -> bool:
    """Take the row for validation: uploading/validating → validating, unless deletion was asked.

    A conditional UPDATE, so that a redelivered message never validates a ready dataset again.
    """
    result = session.execute(
        update(Dataset)
        .where(
            Dataset.id == dataset_id,
            Dataset.status.in_([DatasetStatus.UPLOADING, DatasetStatus.VALIDATING]),
            Dataset.delete_requested.is_(False),
        )
        .values(
            status=DatasetStatus.VALIDATING,
            progress_done=0,
            progress_total=0,
            progress_phase="starting",
            problems=[],
            error="",
        )
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def record_progress(settings: Settings, dataset_id: int, done: int, total: int | None, phase: str) -> None:
    """Write validation progress in a short transaction of its own."""
    with session_scope(settings) as session:
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id)
            .values(progress_done=done, progress_total=total or 0, progress_phase=phase[:32])
        )


def deletion_requested(settings: Settings, dataset_id: int) -> bool:
    """True when the owner deleted the dataset (or its row is gone) while it validated."""
    with session_scope(settings) as session:
        flag = session.scalar(select(Dataset.delete_requested).where(Dataset.id == dataset_id))
    return flag is None or bool(flag)


def remove_dataset(session: Session, settings: Settings, dataset_id: int) -> None:
    """Delete the row and, after the commit, the folder (the worker's clean-up of a deleted dataset)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is not None:
        session.delete(dataset)
        session.flush()
    folder = dataset_dir(settings, dataset_id)
    run_after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """What the row keeps of a ready report (the pages' data); the per-file labels and split stay
    in ``report.json``."""
    pyramids = list(report.get("pyramids") or [])
    return {
        "source": report.get("source", ""),
        "classes": report.get("classes", []),
        "class_to_index": report.get("class_to_index", {}),
        "label_kind": report.get("label_kind", ""),
        "class_counts": report.get("class_counts", {}),
        "split_counts": report.get("split_counts", {}),
        "split_source": report.get("split_source", ""),
        "seed": report.get("seed", 0),
        "image_stats": report.get("image_stats", {}),
        "pyramid_count": len(pyramids),
        "pyramids": pyramids[:SUMMARY_MAX_PYRAMIDS],
        "levels": _levels_of(report),
        "thumbnails": [
            {"index": t["index"], "class": t.get("class"), "path": t.get("path", "")}
            for t in report.get("thumbnails", [])
        ],
        "ignored_count": len(report.get("ignored") or []),
    }


def _levels_of(report: dict[str, Any]) -> dict[str, Any]:
    stats = report.get("image_stats") or {}
    return level_table(list(report.get("pyramids") or []), int(stats.get("count") or 0), stats)


def dataset_levels(settings: Settings, dataset: Dataset) -> dict[str, Any]:
    """The pyramid levels every image of the ready ``dataset`` has (see
    :func:`backend.datasets.levels.level_table`): from its summary, or, for a dataset validated
    before the summary kept them, from its report)."""
    summary = dict(dataset.summary or {})
    if isinstance(summary.get("levels"), dict):
        return summary["levels"]
    report = summary
    if int(summary.get("pyramid_count") or 0) > len(summary.get("pyramids") or []):
        path = dataset_dir(settings, dataset.id) / REPORT_FILE
        if path.is_file():
            report = json.loads(path.read_text(encoding="utf-8"))
    return _levels_of(report)


def store_report(
    session: Session,
    settings: Settings,
    dataset_id: int,
    report: dict[str, Any],
    *,
    imported: dict[str, Any] | None = None,
) -> str:
    """Write ``report.json`` in the dataset folder and the outcome on the row; returns the status.

    An imported dataset keeps what the import did (``summary["import"]``: its path under the
    import root, and whether its files were hard-linked or copied); ``imported`` replaces it.
    A dataset deleted meanwhile is removed instead (and ``"deleted"`` returned).
    """
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.delete_requested:
        remove_dataset(session, settings, dataset_id)
        return "deleted"
    imported = imported or (dataset.summary or {}).get("import")
    if imported:
        report = {**report, "import": imported}
    folder = dataset_dir(settings, dataset_id)
    (folder / REPORT_FILE).write_text(json.dumps(report), encoding="utf-8")
    dataset.validated_at = utcnow()
    if report.get("status") == "ready":
        dataset.status = DatasetStatus.READY
        dataset.summary = summarise(report)
        dataset.num_images = sum(report.get("class_counts", {}).values()) or int(
            (report.get("image_stats") or {}).get("count", 0)
        )
        dataset.num_classes = len(report.get("classes", []))
        dataset.problems = []
    else:
        dataset.status = DatasetStatus.INVALID
        dataset.summary = {}
        dataset.problems = list(report.get("problems", []))
    if imported:
        dataset.summary = {**dataset.summary, "import": imported}
        if imported.get("bytes"):
            dataset.size_bytes = int(imported["bytes"])
    dataset.progress_phase = "done"
    session.flush()
    return dataset.status.value


def fail_validation(session: Session, settings: Settings, dataset_id: int, error: str) -> None:
    """An unexpected error in the worker: the dataset is invalid, with the error as its problem."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.delete_requested:
        remove_dataset(session, settings, dataset_id)
        return
    dataset.status = DatasetStatus.INVALID
    dataset.error = error[:2000]
    dataset.problems = [
        {
            "path": "",
            "code": "internal_error",
            "message": "validation failed unexpectedly; the error is in the worker's log",
            "hint": "Upload the dataset again; if it fails again, report it to an administrator.",
        }
    ]
    dataset.progress_phase = "done"
    session.flush()
