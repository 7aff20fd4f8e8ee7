"""Training task routes under /api/v1: create, list, read, metrics, cancel, retry, clone, delete.

Routes parse, call one service function, and return; the request owns the transaction. Another
user's task is a 404 on every route.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import FileResponse, JSONResponse, Response

from backend import paths  # noqa: F401  (registers the ``row_id`` path convertor)
from backend.deps import CurrentUser, RowId, SessionDep, SettingsDep
from backend.errors import ErrorResponse
from backend.training import service
from backend.training.schemas import (
    ModelExporting,
    PatchCoverage,
    PlanRequest,
    PlanStatus,
    TaskClone,
    TaskCreate,
    TaskDeleted,
    TaskEventRead,
    TaskMetricRead,
    TaskRead,
)

router = APIRouter(prefix="/tasks", tags=["training"], responses={401: {"model": ErrorResponse}})

NOT_FOUND = {404: {"model": ErrorResponse}}
CONFLICT = {409: {"model": ErrorResponse}}


def _read(session, task) -> TaskRead:  # noqa: ANN001 (Session, Task)
    positions = service.queue_positions(session)
    return TaskRead.of(
        task,
        queue_position=positions.get(task.id),
        best=service.best_metrics(session, task),
        coverage=service.coverage_view(task),
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskRead,
    responses={
        400: {"model": ErrorResponse},
        **NOT_FOUND,
        **CONFLICT,
        422: {
            "model": ErrorResponse,
            "description": "A field, or a hyperparameter (`detail`: a list of `{field, message}`), "
            "is not valid.",
        },
    },
)
def create_task(body: TaskCreate, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> TaskRead:
    """Create a training task on one of your ready datasets with a ready backbone (built-in or
    yours): answers 201 `queued`, and a worker trains it (poll `GET /tasks/{id}`)."""
    task = service.create_task(
        session,
        settings,
        user,
        name=body.name,
        dataset_id=body.dataset_id,
        backbone_id=body.backbone_id,
        algorithm=body.algorithm,
        hyperparameters=body.hyperparameters,
        memory_budget_gib=body.memory_budget_gib,
    )
    return _read(session, task)


@router.post(
    "/plan",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PlanStatus,
    responses={**NOT_FOUND, **CONFLICT, 422: {"model": ErrorResponse}},
)
def request_plan(
    body: PlanRequest, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> PlanStatus:
    """Ask a worker which batch size and patches per step fit `memory_budget_gib` for these
    settings (measured on the kind of worker that trains); poll `GET /tasks/plan/{token}`."""
    token = service.request_plan(
        session,
        settings,
        user,
        dataset_id=body.dataset_id,
        backbone_id=body.backbone_id,
        algorithm=body.algorithm,
        hyperparameters=body.hyperparameters,
        memory_budget_gib=body.memory_budget_gib,
    )
    return PlanStatus(token=token, status="planning")


@router.get("/plan/{token}", response_model=PlanStatus, responses=NOT_FOUND)
def read_plan(
    token: Annotated[str, Path(max_length=64)], user: CurrentUser, settings: SettingsDep
) -> PlanStatus:
    """A plan you requested: `planning`, or `done` with the worker's report."""
    report = service.read_plan(settings, user, token)
    return PlanStatus(token=token, status="done" if report is not None else "planning", report=report)


@router.get("", response_model=list[TaskRead])
def list_tasks(user: CurrentUser, session: SessionDep) -> list[TaskRead]:
    """Your tasks, newest first, with their status, progress and queue position."""
    positions = service.queue_positions(session)
    return [TaskRead.of(t, queue_position=positions.get(t.id)) for t in service.list_tasks(session, user)]


@router.get("/{task_id:row_id}", response_model=TaskRead, responses=NOT_FOUND)
def read_task(task_id: RowId, user: CurrentUser, session: SessionDep) -> TaskRead:
    """One of your tasks: status, progress, best and final metrics, error, plan."""
    return _read(session, service.get_task(session, user, task_id))


@router.get("/{task_id:row_id}/metrics", response_model=list[TaskMetricRead], responses=NOT_FOUND)
def read_metrics(
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    after: Annotated[
        int, Query(ge=-1, le=1_000_000, description="Only epochs after this one (0-based).")
    ] = -1,
) -> list[TaskMetricRead]:
    """The task's metrics, one entry per finished epoch (``after``: only the later epochs, for a
    chart that appends what is new)."""
    task = service.get_task(session, user, task_id)
    return [TaskMetricRead.model_validate(m) for m in service.list_metrics(session, task, after=after)]


@router.get("/{task_id:row_id}/events", response_model=list[TaskEventRead], responses=NOT_FOUND)
def read_events(
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=2**62, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 500,
) -> list[TaskEventRead]:
    """The task's log, oldest first: the newest ``limit`` events with an id above ``after`` (the
    last 500 are kept). Poll with the last id you have to get only what is new."""
    task = service.get_task(session, user, task_id)
    return [
        TaskEventRead.model_validate(e) for e in service.list_events(session, task, after=after, limit=limit)
    ]


@router.get("/{task_id:row_id}/coverage", response_model=PatchCoverage | None, responses=NOT_FOUND)
def read_coverage(task_id: RowId, user: CurrentUser, session: SessionDep) -> PatchCoverage | None:
    """PatchGD: how often each cell of the patch grid was sampled for a gradient pass so far
    (``null`` for the baseline and before the first step)."""
    task = service.get_task(session, user, task_id)
    coverage = service.coverage_view(task)
    return PatchCoverage(**coverage) if coverage else None


@router.post("/{task_id:row_id}/cancel", response_model=TaskRead, responses={**NOT_FOUND, **CONFLICT})
def cancel_task(task_id: RowId, user: CurrentUser, session: SessionDep) -> TaskRead:
    """Cancel a task: a queued one at once; a running one stops at its next step (`cancel_requested`
    until the worker ends it `cancelled`). An ended task is a 409."""
    return _read(session, service.cancel_task(session, user, task_id))


@router.post("/{task_id:row_id}/retry", response_model=TaskRead, responses={**NOT_FOUND, **CONFLICT})
def retry_task(task_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> TaskRead:
    """Queue a failed or cancelled task again; it resumes from its last checkpoint."""
    return _read(session, service.retry_task(session, settings, user, task_id))


@router.post(
    "/{task_id:row_id}/clone",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskRead,
    responses={**NOT_FOUND, **CONFLICT, 422: {"model": ErrorResponse}},
)
def clone_task(
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    body: TaskClone | None = None,
) -> TaskRead:
    """A new queued task with the same dataset, backbone and settings; `{"algorithm": "baseline"}`
    (or `"patchgd"`) makes it the same task as the other algorithm."""
    algorithm = body.algorithm if body is not None else None
    return _read(session, service.clone_task(session, settings, user, task_id, algorithm))


@router.delete("/{task_id:row_id}", response_model=TaskDeleted, responses={**NOT_FOUND, **CONFLICT})
def delete_task(task_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> TaskDeleted:
    """Delete a task, its metrics and its files. A running task is refused (409): cancel it first."""
    service.delete_task(session, settings, user, task_id)
    return TaskDeleted(id=task_id)


@router.get(
    "/{task_id:row_id}/model",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        202: {"model": ModelExporting, "description": "A worker is making this format; ask again."},
        400: {"model": ErrorResponse},
        **NOT_FOUND,
        **CONFLICT,
    },
)
def download_model(
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[Literal["safetensors", "torchscript", "onnx"], Query()] = "safetensors",  # noqa: A002
) -> Response:
    """The trained model of a succeeded task: `safetensors` (weights; `config.json` beside it in
    the export folder holds the hyperparameters), `torchscript` or `onnx`. The first request for
    TorchScript or ONNX answers 202 while a worker exports it (then it is kept); ask again."""
    path = service.model_file(session, settings, user, task_id, format)
    if path is None:
        body = ModelExporting(id=task_id, format=format)
        return JSONResponse(body.model_dump(), status_code=202, headers={"Retry-After": "5"})
    return FileResponse(
        path,
        media_type=service.EXPORT_MEDIA_TYPES[format],
        filename=f"task-{task_id}-{path.name}",
    )
