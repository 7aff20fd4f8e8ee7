"""`datasets.validate`: validate an uploaded dataset with `worker.datasets` and record the outcome.

The job claims the row (conditional UPDATE), runs `validate_upload` on `<dataset>/upload` (or,
for a folder imported from the server's import root, hard-links its files into `images/` and
runs `validate_folder` on them) with
progress written to the row at most every :data:`PROGRESS_INTERVAL_SECONDS` and the owner's
delete request checked as often, then stores `ready` (summary) or `invalid` (problems) and the
full report (`report.json`, with the per-file labels and split) in the dataset folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from backend.config import Settings, get_settings
from backend.datasets import service
from backend.db import session_scope
from backend.models import Dataset
from backend.queue import DATASETS_DEMO, DATASETS_PRUNE_UPLOADS, DATASETS_VALIDATE
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)

#: Progress is written, and the delete flag read, at most this often (seconds).
PROGRESS_INTERVAL_SECONDS = 0.5


def dataset_limits(settings: Settings):  # noqa: ANN201 (DatasetLimits, imported lazily)
    """The web settings as the validation library's limits."""
    from worker.datasets import DatasetLimits

    return DatasetLimits(
        max_total_bytes=settings.max_extracted_bytes,
        max_files=settings.max_archive_members,
        max_compression_ratio=settings.max_compression_ratio,
        max_pixels=settings.max_image_pixels,
    )


class _Throttle:
    """Progress writes and cancellation reads, each at most once per interval."""

    def __init__(self, settings: Settings, dataset_id: int) -> None:
        self.settings = settings
        self.dataset_id = dataset_id
        self.last_write = 0.0
        self.last_check = 0.0
        self.stop = False

    def progress(self, done: int, total: int | None, phase: str) -> None:
        now = time.monotonic()
        if now - self.last_write >= PROGRESS_INTERVAL_SECONDS or (total is not None and done >= total):
            self.last_write = now
            service.record_progress(self.settings, self.dataset_id, done, total, phase)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.stop and now - self.last_check >= PROGRESS_INTERVAL_SECONDS:
            self.last_check = now
            self.stop = service.deletion_requested(self.settings, self.dataset_id)
        return self.stop


def validate_dataset(settings: Settings, dataset_id: int) -> str:
    """Validate dataset ``dataset_id``; returns its new status (or why nothing was done)."""
    from worker.datasets import ValidationCancelled, validate_upload

    with session_scope(settings) as session:
        claimed = service.claim_for_validation(session, dataset_id)
        if not claimed:
            # Gone, already validated, or deleted before a worker got to it: finish that deletion.
            dataset = session.get(Dataset, dataset_id)
            if dataset is not None and dataset.delete_requested:
                service.remove_dataset(session, settings, dataset_id)
                return "deleted"
            return "skipped"
        row = session.get(Dataset, dataset_id)
        assert row is not None
        filename = row.original_filename
        folder_import = (
            row.source == "import" and (row.summary or {}).get("import", {}).get("kind") == "folder"
        )
    folder = service.dataset_dir(settings, dataset_id)
    # A redelivered message (the previous worker died) finds the previous attempt's output.
    for leftover in ("images", service.THUMBNAILS_DIR):
        shutil.rmtree(folder / leftover, ignore_errors=True)
    throttle = _Throttle(settings, dataset_id)
    imported: dict | None = None
    try:
        if folder_import:
            report, imported = _validate_imported_folder(settings, folder, filename, throttle)
        else:
            report = validate_upload(
                service.upload_path(settings, dataset_id),
                folder,
                filename=filename,
                limits=dataset_limits(settings),
                on_progress=throttle.progress,
                should_stop=throttle.should_stop,
            )
    except ValidationCancelled:
        with session_scope(settings) as session:
            service.remove_dataset(session, settings, dataset_id)
        logger.info("dataset %s deleted during validation", dataset_id)
        return "deleted"
    except Exception as exc:
        logger.exception("validation of dataset %s failed", dataset_id)
        with session_scope(settings) as session:
            service.fail_validation(session, settings, dataset_id, f"{type(exc).__name__}: {exc}")
        return "invalid"
    with session_scope(settings) as session:
        outcome = service.store_report(session, settings, dataset_id, report.to_dict(), imported=imported)
    logger.info("dataset %s validated: %s", dataset_id, outcome)
    return outcome


def _validate_imported_folder(settings: Settings, folder: Path, relative: str, throttle: _Throttle):  # noqa: ANN202
    """A folder imported from under ``import_root``: hard-link its files into ``images/`` (copy
    where the filesystem refuses), then validate them like an extracted archive. Returns the
    report and what the import did (for the summary); the source is only read."""
    from worker.datasets import DatasetReport, validate_folder
    from worker.datasets.importing import link_folder
    from worker.datasets.problems import problem

    images, thumbnails = folder / "images", folder / service.THUMBNAILS_DIR
    try:
        source = service.resolve_import_path(settings, relative)
    except service.AppError as exc:
        missing = problem(
            relative, "missing_file", exc.detail, "Import the folder again from the import root."
        )
        return DatasetReport(status="invalid", problems=[missing]), {"kind": "folder", "path": relative}
    limits = dataset_limits(settings)
    try:
        linked = link_folder(
            source, images, limits, on_progress=throttle.progress, should_stop=throttle.should_stop
        )
        imported = {
            "kind": "folder",
            "path": relative,
            "method": linked.method,
            "linked": linked.linked,
            "copied": linked.copied,
            "bytes": linked.total_bytes,
        }
        if linked.problems and any(p.code in ("too_many_files", "too_large") for p in linked.problems):
            report = DatasetReport(status="invalid", problems=linked.problems)
        else:
            report = validate_folder(
                images, thumbnails, limits, on_progress=throttle.progress, should_stop=throttle.should_stop
            )
            if linked.problems:
                report.status = "invalid"
                report.problems = linked.problems + report.problems
    except BaseException:
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(thumbnails, ignore_errors=True)
        raise
    if not report.ready:
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(thumbnails, ignore_errors=True)
    return report, imported


@celery_app.task(name=DATASETS_VALIDATE)
def validate(dataset_id: int) -> str:
    """Validate the uploaded dataset ``dataset_id`` (the row says where its upload is)."""
    return validate_dataset(get_settings(), int(dataset_id))


def _counts(count: int) -> dict[str, int]:
    val = test = max(2, count // 6)
    return {"train": count - val - test, "val": val, "test": test}


def build_demo(settings: Settings, dataset_id: int) -> str:
    """Write the demo dataset's archive (``upload``: a tar of ``images/`` and ``labels.csv``), then
    hand it to validation like an upload (``datasets.validate``, enqueued after the commit)."""
    import hashlib
    import tarfile
    import tempfile

    from worker.patchgd.ultramnist import make_ultramnist

    with session_scope(settings) as session:
        options = service.demo_options(session, dataset_id)
        if options is None:
            dataset = session.get(Dataset, dataset_id)
            if dataset is not None and dataset.delete_requested:
                service.remove_dataset(session, settings, dataset_id)
                return "deleted"
            return "skipped"
    folder = service.dataset_dir(settings, dataset_id)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".demo-") as tmp:
        make_ultramnist(
            tmp,
            canvas_size=int(options["canvas_size"]),
            counts=_counts(int(options["count"])),
            seed=int(options["seed"]),
        )
        # Only what a dataset holds: the images and their labels with the split (not the answer key).
        with tarfile.open(service.upload_path(settings, dataset_id), "w") as archive:
            archive.add(Path(tmp) / "labels.csv", arcname="labels.csv")
            archive.add(Path(tmp) / "images", arcname="images")
    upload = service.upload_path(settings, dataset_id)
    digest = hashlib.sha256()
    with open(upload, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        with session_scope(settings) as session:
            service.finish_upload(session, settings, dataset_id, upload.stat().st_size, digest.hexdigest())
    except service.NotFound:
        with session_scope(settings) as session:
            service.remove_dataset(session, settings, dataset_id)
        return "deleted"
    except (service.QuotaExceeded, service.UploadTooLarge) as exc:
        with session_scope(settings) as session:
            service.fail_validation(session, settings, dataset_id, exc.detail)
        return "invalid"
    return "validating"


@celery_app.task(name=DATASETS_DEMO)
def demo(dataset_id: int) -> str:
    """Build the demo dataset ``dataset_id`` (options on its row), then queue its validation."""
    return build_demo(get_settings(), int(dataset_id))


@celery_app.task(name=DATASETS_PRUNE_UPLOADS)
def prune_uploads() -> list[int]:
    """Remove uploads that received nothing for ``stale_upload_hours`` (Celery beat)."""
    settings = get_settings()
    with session_scope(settings) as session:
        removed = service.prune_stale_uploads(session, settings)
    if removed:
        logger.info("removed stale uploads: %s", removed)
    return removed
