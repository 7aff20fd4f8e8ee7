"""Training task routes under /api/v1: create, list, read, metrics, cancel, retry, clone, delete,
model downloads, and using the model: predictions on uploaded images and evaluations on datasets.

Routes parse, call one service function, and return; the request owns the transaction. Another
user's task is a 404 on every route.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from backend import (
    csrf,
    paths,  # noqa: F401  (registers the ``row_id`` path convertor)
)
from backend.backbones.uploads import receive_upload
from backend.db import end_transaction
from backend.deps import CurrentUser, OptionalPrincipal, RowId, SessionDep, SettingsDep
from backend.errors import ErrorResponse, Forbidden, Unauthorized
from backend.models import User
from backend.training import predictions, service
from backend.training.plans import plan_sentence
from backend.training.schemas import (
    EvaluationCreate,
    EvaluationRead,
    ModelExporting,
    PatchCoverage,
    PlanRequest,
    PlanStatus,
    PredictionRead,
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
        plan_token=body.plan_token,
        pyramid_level=body.pyramid_level,
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
    """Ask a worker which settings fit `memory_budget_gib`: batch size and patches per step for
    PatchGD, batch size or a reduced resolution for the baseline (`algorithms` plans both);
    poll `GET /tasks/plan/{token}`, then accept it with `POST /tasks` and `plan_token`."""
    token = service.request_plan(
        session,
        settings,
        user,
        dataset_id=body.dataset_id,
        backbone_id=body.backbone_id,
        algorithm=body.algorithm,
        hyperparameters=body.hyperparameters,
        memory_budget_gib=body.memory_budget_gib,
        algorithms=body.algorithms,
        verify=body.verify,
        pyramid_level=body.pyramid_level,
    )
    return PlanStatus(token=token, status="planning")


@router.get("/plan/{token}", response_model=PlanStatus, responses=NOT_FOUND)
def read_plan(
    token: Annotated[str, Path(max_length=64)], user: CurrentUser, settings: SettingsDep
) -> PlanStatus:
    """A plan you requested: `planning`, `done` with the worker's report, or `failed` with why."""
    report = service.read_plan(settings, user, token)
    if report is None:
        return PlanStatus(token=token, status="planning")
    if report.get("error"):
        return PlanStatus(token=token, status="failed", error=str(report["error"]))
    return PlanStatus(token=token, status="done", report=report, summary=plan_sentence(report))


@router.get("", response_model=list[TaskRead])
def list_tasks(user: CurrentUser, session: SessionDep) -> list[TaskRead]:
    """Your tasks, newest first, with their status, progress and queue position."""
    positions = service.queue_positions(session)
    return [TaskRead.of(t, queue_position=positions.get(t.id)) for t in service.list_tasks(session, user)]


@router.get("/{task_id:row_id}", response_model=TaskRead, responses=NOT_FOUND)
async def read_task(task_id: RowId, user: CurrentUser, session: SessionDep) -> TaskRead:
    """One of your tasks: status, progress, best and final metrics, error, plan."""
    # Polled by scripts: one thread-pool hop reads the task and ends its read-only transaction,
    # and the response is serialised on the event loop. A plain ``def`` endpoint costs two more
    # hops (FastAPI validates a sync endpoint's response in a thread, then the session commits in
    # another), each about 0.1 ms of CPU and a handoff of the GIL.
    return await run_in_threadpool(_read_task_and_end, session, user, task_id)


def _read_task_and_end(session, user: User, task_id: int) -> TaskRead:  # noqa: ANN001 (Session)
    view = _read(session, service.get_task(session, user, task_id))
    end_transaction(session)
    return view


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


# Using the model: predictions and evaluations.

_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "PNG, JPEG, TIFF (pyramidal included), BMP, WebP, or a slide "
                        "(.svs, .ndpi, .scn, .bif).",
                    }
                },
            }
        }
    },
}


def streamed_upload_user(request: Request, principal: OptionalPrincipal) -> User:
    """The caller of a streamed upload; a browser session's CSRF token must be in the header
    (the body is a stream, never parsed as a form to look for it)."""
    if principal is None:
        raise Unauthorized(headers={"WWW-Authenticate": "Bearer"})
    if principal.session is not None and not csrf.matches(
        principal.session.csrf_secret, request.headers.get(csrf.CSRF_HEADER, "")
    ):
        raise Forbidden(
            "The upload did not carry this session's CSRF token in the X-CSRF-Token header. "
            "Reload the page and try again."
        )
    return principal.user


@router.post(
    "/{task_id:row_id}/predictions",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PredictionRead,
    openapi_extra={"requestBody": _PREDICT_BODY},
    responses={
        400: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        **NOT_FOUND,
        **CONFLICT,
        413: {"model": ErrorResponse},
    },
)
async def create_prediction(
    task_id: RowId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: Annotated[User, Depends(streamed_upload_user)],
) -> PredictionRead:
    """Predict on an image of any size (multipart field `file`), slides included: answers 202
    `queued`, and a worker reads the image (streamed when it is large or pyramidal), resamples it
    to the task's training resolution and writes the class probabilities, a thumbnail and, for
    PatchGD, the per-patch evidence heatmap. Poll `GET .../predictions/{id}`. Over
    `max_prediction_upload_bytes` is a 413; nothing of a refused upload is kept. An image the
    worker cannot read ends `failed` with the reason."""
    await run_in_threadpool(predictions.check_can_predict, settings, user.id, task_id)
    received = await receive_upload(
        request,
        settings.data_dir,
        settings.max_prediction_upload_bytes,
        incoming=predictions.incoming_dir(settings, task_id),
        too_large=predictions.too_large_message,
        expected_fields="file",
    )
    try:
        row = predictions.create_prediction(
            session,
            settings,
            user,
            task_id,
            upload=received.path,
            filename=received.filename,
            size=received.size,
            sha256=received.sha256,
        )
    except BaseException:
        received.discard()
        raise
    return PredictionRead.of(row)


@router.get("/{task_id:row_id}/predictions", response_model=list[PredictionRead], responses=NOT_FOUND)
def list_predictions(task_id: RowId, user: CurrentUser, session: SessionDep) -> list[PredictionRead]:
    """The task's predictions, newest first."""
    task = service.get_task(session, user, task_id)
    return [PredictionRead.of(p) for p in predictions.list_predictions(session, task)]


@router.get(
    "/{task_id:row_id}/predictions/{prediction_id:row_id}", response_model=PredictionRead, responses=NOT_FOUND
)
def read_prediction(
    task_id: RowId, prediction_id: RowId, user: CurrentUser, session: SessionDep
) -> PredictionRead:
    """One prediction: status, class probabilities by class name, evidence grid, error."""
    return PredictionRead.of(predictions.get_prediction(session, user, task_id, prediction_id))


def _prediction_image(session, settings, user, task_id: int, prediction_id: int, kind: str) -> FileResponse:  # noqa: ANN001
    row = predictions.get_prediction(session, user, task_id, prediction_id)
    path = predictions.prediction_file(settings, row, kind)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


_PNG = {200: {"content": {"image/png": {}}}, **NOT_FOUND}


@router.get(
    "/{task_id:row_id}/predictions/{prediction_id:row_id}/heatmap.png",
    response_class=FileResponse,
    responses=_PNG,
)
def prediction_heatmap(
    task_id: RowId, prediction_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """The evidence heatmap of a PatchGD prediction, over the image's thumbnail (404 for a
    baseline model, which has none)."""
    return _prediction_image(session, settings, user, task_id, prediction_id, "heatmap")


@router.get(
    "/{task_id:row_id}/predictions/{prediction_id:row_id}/thumbnail.png",
    response_class=FileResponse,
    responses=_PNG,
)
def prediction_thumbnail(
    task_id: RowId, prediction_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """A small copy of the image predicted on."""
    return _prediction_image(session, settings, user, task_id, prediction_id, "thumbnail")


@router.post(
    "/{task_id:row_id}/evaluations",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EvaluationRead,
    responses={**NOT_FOUND, **CONFLICT, 422: {"model": ErrorResponse}},
)
def create_evaluation(
    task_id: RowId, body: EvaluationCreate, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> EvaluationRead:
    """Evaluate the task's model on another of your ready datasets with the same class names
    (else 422): a worker computes accuracy, QWK, per-class recall and the confusion matrix on
    the dataset's held-out split (test, else val; all of it when it has none). Poll the result."""
    row = predictions.create_evaluation(session, settings, user, task_id, body.dataset_id)
    return EvaluationRead.model_validate(row)


@router.get("/{task_id:row_id}/evaluations", response_model=list[EvaluationRead], responses=NOT_FOUND)
def list_evaluations(task_id: RowId, user: CurrentUser, session: SessionDep) -> list[EvaluationRead]:
    """The task's evaluations, newest first."""
    task = service.get_task(session, user, task_id)
    return [EvaluationRead.model_validate(e) for e in predictions.list_evaluations(session, task)]


@router.get(
    "/{task_id:row_id}/evaluations/{evaluation_id:row_id}", response_model=EvaluationRead, responses=NOT_FOUND
)
def read_evaluation(
    task_id: RowId, evaluation_id: RowId, user: CurrentUser, session: SessionDep
) -> EvaluationRead:
    """One evaluation: status, metrics, error."""
    return EvaluationRead.model_validate(predictions.get_evaluation(session, user, task_id, evaluation_id))
