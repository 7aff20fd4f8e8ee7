"""Training tasks as the API takes and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.deps import MAX_ROW_ID
from backend.models import TASK_NAME_MAX_LENGTH, Task, TaskStatus
from worker.patchgd.config import MAX_PYRAMID_LEVEL

Algorithm = Literal["patchgd", "baseline"]


class TaskCreate(BaseModel):
    """A new task. ``hyperparameters`` are the engine's (see the README's engine section); what is
    not given takes the engine default. ``num_classes``, ``backbone`` and ``pretrained_weights``
    come from the dataset and the backbone and may not be given."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=TASK_NAME_MAX_LENGTH)
    dataset_id: int = Field(ge=1, le=MAX_ROW_ID)
    backbone_id: int = Field(ge=1, le=MAX_ROW_ID)
    algorithm: Algorithm = "patchgd"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    memory_budget_gib: float | None = Field(default=None, gt=0, le=4096)
    #: A plan of yours (``POST /tasks/plan``) to accept: the task keeps its part for ``algorithm``
    #: as ``plan`` (and its budget when ``memory_budget_gib`` is not given).
    plan_token: str | None = Field(default=None, max_length=64)
    #: The pyramid level to read the training images from (0: full resolution), then resized to
    #: ``image_size``; every image of the dataset must have it (a dataset without pyramids has
    #: level 0 only; ``summary.levels`` of the dataset lists the levels, sizes and µm/px). Kept
    #: as the ``pyramid_level`` hyperparameter (which may be given there instead). Default: 0.
    pyramid_level: int | None = Field(default=None, ge=0, le=MAX_PYRAMID_LEVEL)


class TaskClone(BaseModel):
    """Options of a clone: the algorithm of the copy (default: the same)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm | None = None


class TaskProgress(BaseModel):
    """The latest progress snapshot of a run."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    fraction: float
    eta_seconds: float | None
    images_per_s: float
    patches_per_s: float
    phase: str


GIB = 1 << 30


class TaskMemory(BaseModel):
    """The run's measured peak against its budget. ``peak_bytes`` is the highest per-epoch peak
    (GPU: allocated by the caching allocator; CPU: the worker process's resident set, libraries
    included); ``within_budget`` is null without a budget or before an epoch was measured.
    ``enforced``: the GPU's allocator was capped at the budget (on CPU a budget is only checked,
    and a run over it ends with ``warning``, not a failure)."""

    peak_bytes: int
    budget_bytes: int | None
    within_budget: bool | None
    enforced: bool
    device: str | None
    warning: str | None

    @classmethod
    def of(cls, task: Task) -> TaskMemory:
        """The memory view of a row."""
        budget = int(task.memory_budget_gib * GIB) if task.memory_budget_gib else None
        peak = int(task.peak_memory_bytes or 0)
        setup = (task.artifacts or {}).get("memory") or {}
        within = None if budget is None or peak <= 0 else peak <= budget
        warning = None
        if within is False:
            warning = (
                f"The measured peak, {peak / GIB:.2f} GiB, exceeded the memory budget of "
                f"{task.memory_budget_gib:g} GiB"
                + (
                    "."
                    if setup.get("enforced")
                    else f" (on {str(setup.get('device') or 'this device').upper()} a budget is "
                    "checked, not enforced)."
                )
            )
        return cls(
            peak_bytes=peak,
            budget_bytes=budget,
            within_budget=within,
            enforced=bool(setup.get("enforced")),
            device=setup.get("device"),
            warning=warning,
        )


class PatchCoverage(BaseModel):
    """PatchGD: how often each cell of the n×n patch grid was sampled for a gradient pass so far
    (``counts``: n*n numbers, row by row; ``sampled``: their sum, the patches sampled)."""

    n: int
    counts: list[int]
    sampled: int
    min: int
    max: int


class TaskRead(BaseModel):
    """A task: what it trains, where it is, what came out.

    ``queue_position`` (1 = next) is set while it is queued. ``patch_coverage`` (PatchGD, one
    task's read only; ``null`` in the list) is the grid's sampling counts so far. ``best`` is the
    epoch with the highest validation accuracy; ``final_metrics`` the final model's evaluation on
    the dataset's held-out split (``split``, ``accuracy``, ``qwk``, ``per_class_recall``,
    ``confusion_matrix``, ``classes``). ``error`` says why a task failed, in words meant for you.
    ``memory`` holds the measured peak against ``memory_budget_gib``; ``plan`` the memory plan
    accepted when the task was created (``POST /tasks`` with ``plan_token``), if any.
    ``pyramid_level`` is the level the training images are read from (the hyperparameter of
    that name; null: level 0).
    """

    id: int
    name: str
    dataset_id: int
    backbone_id: int
    algorithm: str
    hyperparameters: dict[str, Any]
    pyramid_level: int | None = None
    memory_budget_gib: float | None
    status: TaskStatus
    queue_position: int | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: TaskProgress
    error: str
    plan: dict[str, Any]
    peak_memory_bytes: int
    memory: TaskMemory
    best: dict[str, Any] | None
    patch_coverage: PatchCoverage | None = None
    final_metrics: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def of(
        cls,
        task: Task,
        *,
        queue_position: int | None = None,
        best: dict[str, Any] | None = None,
        coverage: dict[str, Any] | None = None,
    ) -> TaskRead:
        """The API view of a row."""
        return cls(
            id=task.id,
            name=task.name,
            dataset_id=task.dataset_id,
            backbone_id=task.backbone_id,
            algorithm=task.algorithm,
            hyperparameters=task.hyperparameters or {},
            pyramid_level=(task.hyperparameters or {}).get("pyramid_level"),
            memory_budget_gib=task.memory_budget_gib,
            status=task.status,
            queue_position=queue_position if task.status == TaskStatus.QUEUED else None,
            attempts=task.attempts,
            max_attempts=task.max_attempts,
            cancel_requested=task.cancel_requested,
            progress=TaskProgress(
                epoch=task.epoch,
                epochs=int((task.hyperparameters or {}).get("epochs", 0)),
                step=task.step,
                total_steps=task.total_steps,
                fraction=task.fraction,
                eta_seconds=task.eta_seconds,
                images_per_s=task.images_per_s,
                patches_per_s=task.patches_per_s,
                phase=task.phase,
            ),
            error=task.error,
            plan=task.plan or {},
            peak_memory_bytes=task.peak_memory_bytes,
            memory=TaskMemory.of(task),
            best=best,
            patch_coverage=PatchCoverage(**coverage) if coverage else None,
            final_metrics=task.final_metrics or {},
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            heartbeat_at=task.heartbeat_at,
        )


class TaskMetricRead(BaseModel):
    """The metrics of one finished epoch."""

    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    val_qwk: float | None
    lr: float
    lrs: dict[str, float]
    peak_memory_bytes: int
    images_per_s: float
    patches_per_s: float
    seconds: float


class TaskDeleted(BaseModel):
    """The answer to a delete."""

    id: int
    status: Literal["deleted"] = "deleted"


class ModelExporting(BaseModel):
    """A model format a worker is exporting: ask again in a few seconds."""

    id: int
    format: str
    status: Literal["exporting"] = "exporting"


class PlanRequest(BaseModel):
    """What to plan: the task's dataset, backbone, algorithm and hyperparameters, and the budget.

    ``algorithms`` adds others to plan at the same settings (``["patchgd", "baseline"]`` compares
    both: the other gets the hyperparameters it shares with ``algorithm``). Without ``verify`` the
    worker's calibrated memory model answers in seconds; with it each choice is also measured by a
    short training trial (minutes on a CPU for large images)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: int = Field(ge=1, le=MAX_ROW_ID)
    backbone_id: int = Field(ge=1, le=MAX_ROW_ID)
    algorithm: Algorithm = "patchgd"
    algorithms: list[Algorithm] = Field(default_factory=list, max_length=2)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    memory_budget_gib: float = Field(gt=0, le=4096)
    verify: bool = False
    #: As in ``POST /tasks``: checked against the dataset (it changes which pixels are read, not
    #: the memory of a step, since every image is resized to ``image_size`` first).
    pyramid_level: int | None = Field(default=None, ge=0, le=MAX_PYRAMID_LEVEL)


class PlanStatus(BaseModel):
    """A plan: ``planning`` until a worker made it, then ``done`` with its ``report`` and ``summary``
    (or ``failed`` with ``error`` when it could not be made)
    (the plan in one sentence). The report holds, for ``algorithm``, ``fits``, ``batch_size``,
    ``patches_per_step``, ``image_size``, ``requested`` (the settings as given) and
    ``requested_bytes`` (their predicted peak), predicted and measured bytes and ``reason``; and the
    same for every planned algorithm under ``algorithms``. Accept it with ``POST /tasks``'s
    ``plan_token``."""

    token: str
    status: Literal["planning", "done", "failed"]
    report: dict[str, Any] | None = None
    summary: str | None = None
    #: Why the plan could not be made (``failed``).
    error: str | None = None


class PredictionRead(BaseModel):
    """A prediction: ``status`` (queued, running, succeeded, failed), ``error`` when it failed.

    ``result`` once it succeeded: ``classes``, ``probabilities`` (class name → probability),
    ``predicted``, ``input`` (the image's size, pyramid level read, whether it was streamed) and,
    for a PatchGD model, ``evidence``: the per-cell evidence grid (``cells[row][col]``, the drop
    of the predicted class's probability when that cell's latent is occluded by the image's mean
    latent). ``heatmap_url`` and ``thumbnail_url`` are set when those images exist.
    """

    id: int
    task_id: int
    status: str
    filename: str
    size_bytes: int
    result: dict[str, Any]
    error: str
    heatmap_url: str | None
    thumbnail_url: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Any) -> PredictionRead:
        """The API view of a row."""
        base = f"/api/v1/tasks/{row.task_id}/predictions/{row.id}"
        files = row.files or {}
        return cls(
            id=row.id,
            task_id=row.task_id,
            status=row.status.value,
            filename=row.filename,
            size_bytes=row.size_bytes,
            result=row.result or {},
            error=row.error,
            heatmap_url=f"{base}/heatmap.png" if files.get("heatmap") else None,
            thumbnail_url=f"{base}/thumbnail.png" if files.get("thumbnail") else None,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class EvaluationCreate(BaseModel):
    """Which dataset to evaluate the task's model on."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: int = Field(ge=1, le=MAX_ROW_ID)


class EvaluationRead(BaseModel):
    """An evaluation: ``status``, ``error`` when it failed, and once it succeeded ``result``:
    ``split`` (``test`` or ``val``: the dataset's held-out split; ``all`` when it has none),
    ``accuracy``, ``qwk``, ``per_class_recall``, ``confusion_matrix`` (rows: true class),
    ``classes``, ``num_samples``, ``loss``."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: int
    dataset_id: int | None
    dataset_name: str
    status: str
    result: dict[str, Any]
    error: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TaskEventRead(BaseModel):
    """One line of a task's log. ``kind``: claimed, resumed, epoch, checkpoint, cancel_requested,
    cancel_seen, lease_lost, requeued, queued, error, finished."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    message: str
    attempt: int
    worker_id: str
    data: dict[str, Any]
    created_at: datetime
