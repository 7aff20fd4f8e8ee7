"""Using a trained task's model: predictions on uploaded images and evaluations on other datasets.

Both are jobs a worker runs on the light queue (``predictions.run``, ``evaluations.run``); only a
succeeded task has a model to use (409 otherwise), and another user's task, prediction or
evaluation is a 404 everywhere. A prediction's files live under
``<data_dir>/tasks/<task id>/predictions/<prediction id>/`` (deleting the task removes them with the
task's folder); the upload is streamed to ``predictions/incoming/`` first and moved there once its
row exists, so a refused upload leaves nothing behind.

The worker's writes are conditional UPDATEs (``queued → running`` claims a job, ``running →``
an outcome), in short transactions of their own; a job whose row vanished (its task was
deleted meanwhile) writes nothing and removes what it wrote.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.datasets.service import REPORT_FILE, dataset_dir
from backend.db import session_scope
from backend.errors import AppError, Conflict, Invalid, NotFound
from backend.models import (
    PREDICTION_FILENAME_MAX_LENGTH,
    Dataset,
    Evaluation,
    JobStatus,
    Prediction,
    Task,
    TaskStatus,
    User,
)
from backend.models.base import utcnow
from backend.queue import EVALUATIONS_RUN, PREDICTIONS_RUN, enqueue_after_commit
from backend.training.service import get_task, ready_dataset, task_dir

PREDICTIONS_DIR = "predictions"
INCOMING_DIR = "incoming"
#: The files a prediction may have, and their media types.
PREDICTION_FILES = {"thumbnail": "image/png", "heatmap": "image/png"}
#: Upload names keep their extension when it is one of these (the worker checks the content).
KEPT_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".svs", ".ndpi", ".scn", ".bif"}
)
ACTIVE_NAMES = frozenset({JobStatus.QUEUED.value, JobStatus.RUNNING.value})


class ClassesMismatch(AppError):
    """The dataset's classes are not the ones the task's model was trained on."""

    status_code = 422
    code = "classes_mismatch"
    default_detail = "The dataset's classes differ from the task's."


def predictions_dir(settings: Settings, task_id: int) -> Path:
    """The folder of every prediction of task ``task_id``."""
    return task_dir(settings, task_id) / PREDICTIONS_DIR


def incoming_dir(settings: Settings, task_id: int) -> Path:
    """Where an upload to predict on is streamed before its row exists."""
    return predictions_dir(settings, task_id) / INCOMING_DIR


def prediction_dir(settings: Settings, task_id: int, prediction_id: int) -> Path:
    """The folder of one prediction: the uploaded image, the thumbnail, the heatmap."""
    return predictions_dir(settings, task_id) / str(int(prediction_id))


def too_large_message(limit: int) -> str:
    """What a 413 for an image to predict on says."""
    return (
        f"The image is larger than the {limit / 1024**2:.0f} MiB accepted for a prediction "
        "(max_prediction_upload_bytes)."
    )


def succeeded_task(session: Session, user: User, task_id: int) -> Task:
    """The user's task, which must have succeeded (only then is there a model): 404, else 409."""
    task = get_task(session, user, task_id)
    if task.status != TaskStatus.SUCCEEDED:
        raise Conflict(
            f"Task {task.name!r} is {task.status.value}: only a succeeded task has a model to use."
        )
    return task


def check_can_predict(settings: Settings, user_id: int, task_id: int) -> None:
    """The upload's check before a byte is read (its own short transaction)."""
    with session_scope(settings) as session:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("No such task.")
        succeeded_task(session, user, task_id)


def _stored_name(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return "image" + (suffix if suffix in KEPT_SUFFIXES else ".upload")


def create_prediction(
    session: Session,
    settings: Settings,
    user: User,
    task_id: int,
    *,
    upload: Path,
    filename: str,
    size: int,
    sha256: str,
) -> Prediction:
    """Record a queued prediction, move the uploaded file into its folder, send the job after the
    commit. The caller removes ``upload`` if this raises."""
    task = succeeded_task(session, user, task_id)
    if size == 0:
        raise Invalid("The file is empty: choose an image to predict on.")
    prediction = Prediction(
        owner_id=user.id,
        task_id=task.id,
        status=JobStatus.QUEUED,
        filename=Path(filename or "image").name[:PREDICTION_FILENAME_MAX_LENGTH],
        size_bytes=size,
        sha256=sha256,
        result={},
        error="",
        files={},
        dispatched_at=utcnow(),
    )
    session.add(prediction)
    session.flush()
    folder = prediction_dir(settings, task.id, prediction.id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _stored_name(filename)
    shutil.move(upload, target)
    prediction.files = {"image": str(target.relative_to(settings.data_dir))}
    session.flush()
    enqueue_after_commit(session, settings, PREDICTIONS_RUN, prediction.id)
    return prediction


def list_predictions(session: Session, task: Task) -> Sequence[Prediction]:
    """The task's predictions, newest first."""
    return session.scalars(
        select(Prediction).where(Prediction.task_id == task.id).order_by(Prediction.id.desc())
    ).all()


def get_prediction(session: Session, user: User, task_id: int, prediction_id: int) -> Prediction:
    """The user's prediction ``prediction_id`` of task ``task_id``; 404 for anyone else's."""
    get_task(session, user, task_id)
    prediction = session.get(Prediction, prediction_id)
    if prediction is None or prediction.owner_id != user.id or prediction.task_id != task_id:
        raise NotFound("No such prediction.")
    return prediction


def prediction_file(settings: Settings, prediction: Prediction, kind: str) -> Path:
    """The ``thumbnail`` or ``heatmap`` image of a prediction, or 404 (none yet, or none for it)."""
    relative = (prediction.files or {}).get(kind) if kind in PREDICTION_FILES else None
    if not relative:
        what = "heatmap" if kind == "heatmap" else "thumbnail"
        raise NotFound(f"This prediction has no {what}.")
    path = (settings.data_dir / relative).resolve()
    folder = prediction_dir(settings, prediction.task_id, prediction.id).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise NotFound("The file is gone.")
    return path


def task_classes(session: Session, task: Task) -> list[str]:
    """The class names of the task's model, index order (from its final metrics or its dataset)."""
    classes = (task.final_metrics or {}).get("classes")
    if classes:
        return [str(c) for c in classes]
    dataset = session.get(Dataset, task.dataset_id)
    return [str(c) for c in ((dataset.summary or {}).get("classes", []) if dataset else [])]


def create_evaluation(
    session: Session, settings: Settings, user: User, task_id: int, dataset_id: int
) -> Evaluation:
    """Record a queued evaluation of the task's model on one of the user's ready datasets with
    the same class names, and send the job after the commit."""
    task = succeeded_task(session, user, task_id)
    dataset = ready_dataset(session, user, dataset_id, use="used")
    ours = task_classes(session, task)
    theirs = [str(c) for c in (dataset.summary or {}).get("classes", [])]
    if sorted(ours) != sorted(theirs):
        missing = sorted(set(ours) - set(theirs))
        extra = sorted(set(theirs) - set(ours))
        parts = []
        if missing:
            parts.append(f"it lacks {', '.join(missing)}")
        if extra:
            parts.append(f"it has {', '.join(extra)}, which the model does not know")
        raise ClassesMismatch(
            f"Dataset {dataset.name!r} has other classes than the task's model "
            f"({', '.join(ours)}): {'; '.join(parts) or 'they differ'}. "
            "Evaluate on a dataset with the same class names."
        )
    evaluation = Evaluation(
        owner_id=user.id,
        task_id=task.id,
        dataset_id=dataset.id,
        dataset_name=dataset.name,
        status=JobStatus.QUEUED,
        result={},
        error="",
        dispatched_at=utcnow(),
    )
    session.add(evaluation)
    session.flush()
    enqueue_after_commit(session, settings, EVALUATIONS_RUN, evaluation.id)
    return evaluation


def list_evaluations(session: Session, task: Task) -> Sequence[Evaluation]:
    """The task's evaluations, newest first."""
    return session.scalars(
        select(Evaluation).where(Evaluation.task_id == task.id).order_by(Evaluation.id.desc())
    ).all()


def get_evaluation(session: Session, user: User, task_id: int, evaluation_id: int) -> Evaluation:
    """The user's evaluation ``evaluation_id`` of task ``task_id``; 404 for anyone else's."""
    get_task(session, user, task_id)
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None or evaluation.owner_id != user.id or evaluation.task_id != task_id:
        raise NotFound("No such evaluation.")
    return evaluation


# The worker's side.


def claim(settings: Settings, model: type[Prediction] | type[Evaluation], job_id: int) -> bool:
    """queued → running, once: a duplicate message finds it claimed and does nothing."""
    now = utcnow()
    with session_scope(settings) as session:
        done = session.execute(
            update(model)
            .where(model.id == job_id, model.status == JobStatus.QUEUED)
            .values(status=JobStatus.RUNNING, started_at=now)
        ).rowcount  # type: ignore[attr-defined]
    return done == 1


def prediction_spec(settings: Settings, prediction_id: int) -> dict[str, Any] | None:
    """What the worker needs to run a claimed prediction (None when its row is gone)."""
    with session_scope(settings) as session:
        prediction = session.get(Prediction, prediction_id)
        if prediction is None:
            return None
        task = session.get(Task, prediction.task_id)
        if task is None:
            return None
        return {
            "task_id": task.id,
            "algorithm": task.algorithm,
            "classes": task_classes(session, task),
            "task_dir": str(task_dir(settings, task.id)),
            "folder": str(prediction_dir(settings, task.id, prediction.id)),
            "image": str(settings.data_dir / (prediction.files or {}).get("image", "")),
            "filename": prediction.filename,
        }


def evaluation_spec(settings: Settings, evaluation_id: int) -> dict[str, Any] | None:
    """What the worker needs to run a claimed evaluation (None when its row is gone)."""
    with session_scope(settings) as session:
        evaluation = session.get(Evaluation, evaluation_id)
        if evaluation is None:
            return None
        task = session.get(Task, evaluation.task_id)
        if task is None or evaluation.dataset_id is None:
            return None
        folder = dataset_dir(settings, evaluation.dataset_id)
        return {
            "task_id": task.id,
            "classes": task_classes(session, task),
            "task_dir": str(task_dir(settings, task.id)),
            "dataset_dir": str(folder),
            "report_path": str(folder / REPORT_FILE),
            "work_dir": str(task_dir(settings, task.id) / "evaluations" / str(evaluation.id)),
        }


def finish(
    settings: Settings,
    model: type[Prediction] | type[Evaluation],
    job_id: int,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: str = "",
    files: dict[str, Any] | None = None,
) -> bool:
    """Write a running job's outcome; False when its row is gone (nothing written)."""
    values: dict[str, Any] = {"status": status, "error": error[:4000], "finished_at": utcnow()}
    if result is not None:
        values["result"] = result
    if files is not None:
        values["files"] = files
    with session_scope(settings) as session:
        done = session.execute(
            update(model).where(model.id == job_id, model.status == JobStatus.RUNNING).values(**values)
        ).rowcount  # type: ignore[attr-defined]
    return done == 1


#: Message name of each job kind.
JOB_NAMES = {Prediction: PREDICTIONS_RUN, Evaluation: EVALUATIONS_RUN}


def keep_jobs_moving(
    session: Session, settings: Settings, now: datetime | None = None
) -> dict[str, list[int]]:
    """The re-dispatcher's pass over predictions and evaluations (Celery beat, with the tasks'):
    a job still queued ``task_redispatch_after_seconds`` after its last message is sent again (a
    failed enqueue, a lost message; a duplicate finds it claimed), and one running longer than
    ``prediction_timeout_seconds`` is failed with the reason (its worker died)."""
    now = now or utcnow()
    resend_before = now - timedelta(seconds=settings.task_redispatch_after_seconds)
    give_up_before = now - timedelta(seconds=settings.prediction_timeout_seconds)
    outcome: dict[str, list[int]] = {"resent": [], "failed": []}
    for model, name in JOB_NAMES.items():
        stale = session.scalars(
            select(model.id).where(model.status == JobStatus.QUEUED, model.dispatched_at < resend_before)
        ).all()
        for job_id in stale:
            sent = session.execute(
                update(model)
                .where(
                    model.id == job_id, model.status == JobStatus.QUEUED, model.dispatched_at < resend_before
                )
                .values(dispatched_at=now)
            ).rowcount  # type: ignore[attr-defined]
            if sent:
                outcome["resent"].append(job_id)
                enqueue_after_commit(session, settings, name, job_id)
        hours = settings.prediction_timeout_seconds / 3600
        reason = f"No result {hours:g} h after a worker started it: the worker stopped. Try again."
        lost = session.scalars(
            select(model.id).where(model.status == JobStatus.RUNNING, model.started_at < give_up_before)
        ).all()
        for job_id in lost:
            if session.execute(
                update(model)
                .where(
                    model.id == job_id, model.status == JobStatus.RUNNING, model.started_at < give_up_before
                )
                .values(status=JobStatus.FAILED, finished_at=now, error=reason)
            ).rowcount:  # type: ignore[attr-defined]
                outcome["failed"].append(job_id)
    session.flush()
    return outcome
