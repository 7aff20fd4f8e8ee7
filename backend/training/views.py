"""Task pages: the list (live status and progress), the create form, a task's page and the
cancel, retry, clone and delete buttons (forms carrying the CSRF token).

A task's page is live while the run is queued or running: its status fragment is polled (HTMX,
every 2 s; the numbers in docs/benchmarks.md say why polling and not SSE) and carries progress,
the peak memory against the budget, PatchGD's patch-coverage heatmap and, out of band, the new
epoch rows and log lines. The uPlot charts (frontend/static/js/task-live.js) append the new epochs
from the metrics API. Everything comes from the database, which the workers write.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import psutil
from fastapi import APIRouter, Depends, Form, Path, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from backend.backbones import service as backbones
from backend.datasets import service as datasets
from backend.db import end_transaction
from backend.deps import CurrentUser, RowId, SessionDep, SettingsDep
from backend.errors import AppError, NotFound
from backend.models import Dataset, DatasetStatus, TaskMetric, TaskStatus
from backend.training import plans, predictions, service
from backend.training.schemas import EvaluationRead, PredictionRead, TaskRead
from backend.ui.templating import flash, render
from worker.patchgd.config import ALGORITHMS, IN_MEMORY_MAX_PIXELS

router = APIRouter(tags=["pages"], include_in_schema=False)

#: Form fields of the create page: (name, label, algorithm or "" for both, step).
FORM_FIELDS = [
    ("image_size", "Image size (px)", "", "1"),
    ("patch_size", "Patch size (px)", "patchgd", "1"),
    ("sampling", "Patches sampled per inner step (fraction)", "patchgd", "any"),
    ("patches_per_step", "Patches per inner step (k; instead of the fraction)", "patchgd", "1"),
    ("epochs", "Epochs", "", "1"),
    ("batch_size", "Batch size", "", "1"),
    ("lr_backbone", "Learning rate, backbone", "patchgd", "any"),
    ("lr_head", "Learning rate, head", "patchgd", "any"),
    ("lr", "Learning rate", "baseline", "any"),
    ("warmup_epochs", "Warm-up epochs", "", "1"),
    ("checkpoint_every_minutes", "Checkpoint every (minutes)", "", "any"),
]


def _defaults(settings: Any) -> dict[str, dict[str, Any]]:
    """The engine's defaults of each algorithm for the form's fields."""
    result = {}
    for name, cls in ALGORITHMS.items():
        values = {f: getattr(cls, f, None) for f, *_ in FORM_FIELDS}
        values["checkpoint_every_minutes"] = settings.task_checkpoint_every_minutes
        result[name] = {k: v for k, v in values.items() if v is not None or k == "sampling"}
    return result


def _number(raw: str) -> int | float | str:
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


#: Log lines shown when the page opens (the API has the last 500).
EVENTS_SHOWN = 50
HEATMAP_CELL = 24


def memory_view(task: TaskRead, metrics: list[TaskMetric], device_total: int) -> dict[str, Any] | None:
    """The peak memory measured so far against the budget (or, without one, the memory of the
    device the task ran on, as its worker recorded it, else this machine's)."""
    peak = max([task.peak_memory_bytes, *(m.peak_memory_bytes for m in metrics)], default=0)
    if task.memory_budget_gib:
        limit, against = int(task.memory_budget_gib * 2**30), "budget"
    else:
        limit, against = device_total, "device"
    if not limit:
        return None
    return {
        "peak": peak,
        "peak_mib": peak / 2**20,
        "limit": limit,
        "limit_gib": limit / 2**30,
        "against": against,
        "percent": min(100, round(100 * peak / limit)),
        "over": against == "budget" and peak > limit,
        "over_mib": max(0, peak - limit) / 2**20,
        "epochs": [
            {"epoch": m.epoch + 1, "percent": min(100, round(100 * m.peak_memory_bytes / limit))}
            for m in metrics
        ],
    }


def _device_total(task: Any) -> int:
    attempts = (task.artifacts or {}).get("attempts") or []
    recorded = int((attempts[-1] if attempts else {}).get("memory_total_bytes") or 0)
    return recorded or int(psutil.virtual_memory().total)


def heatmap(coverage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The coverage grid as SVG cells: a white-to-accent ramp from the least to the most sampled
    cell, with the count in each cell's title."""
    if not coverage:
        return None
    n, counts = coverage["n"], coverage["counts"]
    low, high = coverage["min"], coverage["max"]
    span = (high - low) or 1
    cells = []
    for index, count in enumerate(counts):
        t = (count - low) / span if high > low else (1.0 if high else 0.0)
        # From the accent's light tint (#eef2ff) to the accent (#4f46e5).
        rgb = tuple(round(a + (b - a) * t) for a, b in zip((238, 242, 255), (79, 70, 229), strict=True))
        cells.append(
            {
                "x": (index % n) * HEATMAP_CELL,
                "y": (index // n) * HEATMAP_CELL,
                "fill": "#{:02x}{:02x}{:02x}".format(*rgb),
                "count": count,
                "row": index // n,
                "col": index % n,
            }
        )
    mean = coverage["sampled"] / len(counts)
    return {
        **coverage,
        "cells": cells,
        "size": n * HEATMAP_CELL,
        "cell": HEATMAP_CELL,
        "mean": mean,
        "spread": (high - low) / mean if mean else 0.0,
    }


def _context(
    session: Any, task: Any, *, after_epoch: int | None = None, after_event: int | None = None
) -> dict[str, Any]:
    """What the page and its status fragment show; with ``after_epoch``/``after_event`` (the
    fragment's poll) the epochs and log lines the page does not have yet."""
    # Polled by every open page: one query each for the metrics and the log, the queue only
    # while the task waits in it.
    positions = service.queue_positions(session) if task.status == TaskStatus.QUEUED else {}
    coverage = service.coverage_view(task)
    metrics = list(service.list_metrics(session, task))
    view = TaskRead.of(
        task,
        queue_position=positions.get(task.id),
        best=service.best_metrics(session, task, metrics),
        coverage=coverage,
    )
    events = service.list_events(session, task, after=after_event or 0, limit=EVENTS_SHOWN)
    last_event = events[-1].id if events else (after_event or 0)
    return {
        "task": view,
        "metrics": metrics,
        "new_metrics": [m for m in metrics if after_epoch is not None and m.epoch >= after_epoch],
        "events": events,
        "last_event": last_event,
        "memory": memory_view(view, metrics, _device_total(task)),
        "heatmap": heatmap(coverage),
        "percent": round(100 * view.progress.fraction),
        "active_run": view.status.value in ("queued", "running"),
        "polling": after_epoch is not None,
    }


@router.get("/tasks")
def tasks_page(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    """The user's tasks with status and progress (polled while any is queued or running)."""
    return render(request, "training/list.html", {"active": "tasks", **_rows(session, user)})


def _rows(session: Any, user: Any) -> dict[str, Any]:
    positions = service.queue_positions(session)
    rows = [TaskRead.of(t, queue_position=positions.get(t.id)) for t in service.list_tasks(session, user)]
    return {"rows": rows, "live": any(r.status.value in ("queued", "running") for r in rows)}


@router.get("/tasks/rows")
def tasks_rows(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    """The list's table, polled by the page while a task is queued or running."""
    return render(request, "training/rows.html", _rows(session, user))


def _px(span: list[int] | None) -> str:
    if not span or span[0] is None:
        return "?"
    low, high = int(span[0]), int(span[1])
    return f"{high:,}" if low == high else f"({low:,}–{high:,})"


def _size(entry: dict[str, Any]) -> str:
    return f"{_px(entry.get('width'))}×{_px(entry.get('height'))} px"


def _mpp(low: float, high: float) -> str:
    return f"{low:.2f} µm/px" if abs(high - low) < 0.005 else f"{low:.2f}–{high:.2f} µm/px"


def level_choices(table: dict[str, Any], chosen: Any, image_size: int) -> dict[str, Any]:
    """The form's pyramid-level control for a dataset's level table
    (:func:`backend.datasets.levels.level_table`): one option per level (size, µm/px or "µm/px
    unknown"; a level too large to read whole is disabled), the selected level (``chosen`` if the
    dataset has it, else the first readable one) and what training at ``image_size`` makes of it."""
    entries = list(table.get("levels") or [])
    options = []
    for entry in entries:
        mpp = entry.get("mpp")
        too_large = int(entry.get("max_pixels") or 0) > IN_MEMORY_MAX_PIXELS
        options.append(
            {
                "level": entry["level"],
                "label": " · ".join(
                    [
                        f"Level {entry['level']}",
                        _size(entry),
                        _mpp(*mpp) if mpp else "µm/px unknown",
                        *(["too large to read whole"] if too_large else []),
                    ]
                ),
                "disabled": too_large,
            }
        )
    readable = [o["level"] for o in options if not o["disabled"]]
    try:
        selected = int(chosen)
    except (TypeError, ValueError):
        selected = -1
    if selected not in readable:
        selected = readable[0] if readable else 0
    entry = entries[selected] if selected < len(entries) else {}
    width = (entry.get("width") or [None, None])[1]
    effect = ""
    if entry:
        words = f"{_size(entry)}"
        mpp = entry.get("mpp")
        if mpp:
            words += f" at {_mpp(*mpp)}"
        # Every image is resized to image_size²: one training pixel spans level width / image_size
        # level pixels (across; down likewise with the height).
        widths = entry.get("width") or [0, 0]
        step = f"resized to {image_size:,}×{image_size:,} px"
        physical = table.get("physical_um")  # the images' widths in µm: the same at every level
        if mpp and physical and widths[0]:
            step += f": {_mpp(physical[0] / image_size, physical[1] / image_size)} per training pixel across"
            if width and width < image_size:
                step += f" (enlarged: the detail stays the level's {_mpp(*mpp)})"
        elif width:
            factor = width / image_size
            scale = f"shrunk {factor:.3g}×" if factor >= 1 else f"enlarged {1 / factor:.3g}×"
            step += f" ({scale}; µm/px unknown)"
        effect = f"Level {selected}: {words} → {step}."
    return {
        "pyramidal": bool(table.get("pyramidal")),
        "count": int(table.get("count") or 1),
        "differing": bool(table.get("differing")),
        "most": table.get("most"),
        "mpp_known": bool(table.get("mpp_known")),
        "options": options,
        "selected": selected,
        "effect": effect,
        "single": options[0]["label"] if options else "",
    }


def _level_field(
    session: Any, settings: Any, user: Any, ready: list[Any], values: dict[str, Any]
) -> dict[str, Any] | None:
    """The level control of the form's dataset (the one chosen, else the first ready one)."""
    by_id = {str(d.id): d for d in ready}
    dataset = by_id.get(str(values.get("dataset_id") or "")) or (ready[0] if ready else None)
    if dataset is None:
        return None
    algorithm = values.get("algorithm") if values.get("algorithm") in ALGORITHMS else "patchgd"
    raw = str(values.get("image_size") or "").strip()
    default = int(getattr(ALGORITHMS[algorithm], "image_size", 512))
    image_size = int(raw) if raw.isdigit() and 0 < int(raw) <= 1 << 20 else default
    table = datasets.dataset_levels(settings, dataset)
    return level_choices(table, values.get("pyramid_level"), image_size)


def _form_context(session: Any, settings: Any, user: Any, values: dict[str, Any] | None = None) -> dict:
    ready = [d for d in datasets.list_datasets(session, user) if d.status == DatasetStatus.READY]
    backbones.ensure_builtins(session, settings)  # the catalog's rows, as the backbones page shows them
    visible = [b for b in backbones.list_visible(session, user) if b.status.value == "ready"]
    defaults = _defaults(settings)
    return {
        "active": "tasks",
        "datasets": ready,
        "backbones": visible,
        "fields": FORM_FIELDS,
        "defaults": defaults,
        "defaults_json": json.dumps(defaults),
        "values": values or {},
        "levels": _level_field(session, settings, user, ready, values or {}),
        "errors": [],
        **EMPTY_PLAN,
    }


@router.get("/tasks/new/levels")
def levels_fragment(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    dataset_id: str = "",
    pyramid_level: str = "",
    image_size: str = "",
    algorithm: str = "patchgd",
) -> Response:
    """The form's pyramid-level control for ``dataset_id`` (swapped in when the dataset, the level
    or the image size changes): the levels with their size and µm/px, and the chosen one's effect."""
    ready = [d for d in datasets.list_datasets(session, user) if d.status == DatasetStatus.READY]
    if dataset_id and dataset_id not in {str(d.id) for d in ready}:
        raise NotFound("No such dataset.")
    values = {
        "dataset_id": dataset_id,
        "pyramid_level": pyramid_level,
        "image_size": image_size,
        "algorithm": algorithm,
    }
    return render(
        request, "training/levels.html", {"levels": _level_field(session, settings, user, ready, values)}
    )


@router.get("/tasks/new")
def new_task_page(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The create form: dataset, backbone, algorithm, key hyperparameters (engine defaults), budget."""
    return render(request, "training/new.html", _form_context(session, settings, user))


def form_values(
    name: Annotated[str, Form()] = "",
    dataset_id: Annotated[str, Form()] = "",
    backbone_id: Annotated[str, Form()] = "",
    algorithm: Annotated[str, Form()] = "patchgd",
    memory_budget_gib: Annotated[str, Form()] = "",
    image_size: Annotated[str, Form()] = "",
    patch_size: Annotated[str, Form()] = "",
    sampling: Annotated[str, Form()] = "",
    patches_per_step: Annotated[str, Form()] = "",
    epochs: Annotated[str, Form()] = "",
    batch_size: Annotated[str, Form()] = "",
    lr_backbone: Annotated[str, Form()] = "",
    lr_head: Annotated[str, Form()] = "",
    lr: Annotated[str, Form()] = "",
    warmup_epochs: Annotated[str, Form()] = "",
    checkpoint_every_minutes: Annotated[str, Form()] = "",
    plan_token: Annotated[str, Form()] = "",
    pyramid_level: Annotated[str, Form()] = "",
) -> dict[str, str]:
    """The create form's fields as typed (strings; parsed by :func:`_hyperparameters`)."""
    return {
        "name": name,
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": algorithm,
        "memory_budget_gib": memory_budget_gib,
        "image_size": image_size,
        "patch_size": patch_size,
        "sampling": sampling,
        "patches_per_step": patches_per_step,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr_backbone": lr_backbone,
        "lr_head": lr_head,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
        "checkpoint_every_minutes": checkpoint_every_minutes,
        "plan_token": plan_token,
        "pyramid_level": pyramid_level,
    }


FormValues = Annotated[dict[str, str], Depends(form_values)]


def _hyperparameters(values: dict[str, str]) -> dict[str, Any]:
    """The hyperparameters of the form's algorithm that were filled in (fields of the other are ignored)."""
    algorithm = values["algorithm"]
    chosen = {
        field: _number(values[field].strip())
        for field, _label, only, _step in FORM_FIELDS
        if values[field].strip() and (not only or only == algorithm)
    }
    if values.get("pyramid_level", "").strip():
        chosen["pyramid_level"] = _number(values["pyramid_level"].strip())
    return chosen


def _error_lines(exc: Exception) -> list[str]:
    detail = getattr(exc, "detail", str(exc))
    if isinstance(detail, list):
        return [
            f"{item['field']}: {item['message']}" if item.get("field") else item["message"] for item in detail
        ]
    return [str(detail)]


def _budget(values: dict[str, str]) -> float | None:
    raw = values["memory_budget_gib"].strip()
    if not raw:
        return None
    budget = float(raw)
    if not math.isfinite(budget) or not 0 < budget <= 4096:
        raise ValueError("The memory budget must be a number of GiB above 0 and at most 4096.")
    return budget


@router.post("/tasks/new")
def create_from_form(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep, values: FormValues
) -> Response:
    """Create the task from the form (fields of the other algorithm are ignored); a refused field
    re-renders the form with the reasons. An accepted plan (``plan_token``) is kept by the task."""
    try:
        task = service.create_task(
            session,
            settings,
            user,
            name=values["name"],
            dataset_id=int(values["dataset_id"] or 0),
            backbone_id=int(values["backbone_id"] or 0),
            algorithm=values["algorithm"],
            hyperparameters=_hyperparameters(values),
            memory_budget_gib=_budget(values),
            plan_token=values["plan_token"].strip() or None,
        )
    except (AppError, ValueError) as exc:
        context = _form_context(session, settings, user, values)
        context["errors"] = _error_lines(exc)
        return render(request, "training/new.html", context, status_code=422)
    response = RedirectResponse(f"/tasks/{task.id}", status_code=303)
    flash(response, request, "success", f"Task {task.name!r} is queued.")
    return response


#: What the plan panel shows before anything was planned.
EMPTY_PLAN = {"token": None, "report": None, "plan_errors": [], "accepted": "", "rows": [], "summary": ""}


def _plan_panel(request: Request, context: dict[str, Any], status_code: int = 200) -> Response:
    return render(request, "training/plan_panel.html", {**EMPTY_PLAN, **context}, status_code=status_code)


@router.post("/tasks/new/plan")
def plan_from_form(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep, values: FormValues
) -> Response:
    """Plan both algorithms for the form's settings and budget (a worker on the light queue); the
    panel returned polls until the plan is there."""
    try:
        budget = _budget(values)
        if budget is None or budget <= 0:
            raise ValueError("Give a memory budget (GiB) to plan for.")
        token = service.request_plan(
            session,
            settings,
            user,
            dataset_id=int(values["dataset_id"] or 0),
            backbone_id=int(values["backbone_id"] or 0),
            algorithm=values["algorithm"],
            hyperparameters=_hyperparameters(values),
            memory_budget_gib=budget,
            algorithms=list(ALGORITHMS),
        )
    except (AppError, ValueError) as exc:
        return _plan_panel(request, {"plan_errors": _error_lines(exc)}, status_code=422)
    return _plan_panel(request, {"token": token, "report": None})


def _plan_context(report: dict[str, Any], token: str, accepted: str = "") -> dict[str, Any]:
    entries = report.get("algorithms") or {}
    rows = [
        {
            "algorithm": name,
            "title": "PatchGD" if name == "patchgd" else "Baseline",
            "phrase": plans.algorithm_phrase(name, entries[name], float(report.get("budget_gib") or 0)),
            **entries[name],
        }
        for name in ("patchgd", "baseline")
        if name in entries
    ]
    return {
        "token": token,
        "report": report,
        "summary": plans.plan_sentence(report),
        "rows": rows,
        "accepted": accepted,
    }


@router.get("/tasks/new/plan/{token}")
def plan_panel(
    request: Request, token: Annotated[str, Path(max_length=64)], user: CurrentUser, settings: SettingsDep
) -> Response:
    """The plan panel: still planning (it polls again), or both algorithms with an Accept button each."""
    report = service.read_plan(settings, user, token)
    if report is None:
        return _plan_panel(request, {"token": token, "report": None})
    if report.get("error"):
        return _plan_panel(request, {"plan_errors": [str(report["error"])]})
    return _plan_panel(request, _plan_context(report, token))


@router.post("/tasks/new/plan/accept")
def accept_plan(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    values: FormValues,
    plan_algorithm: Annotated[str, Form()] = "",
) -> Response:
    """Accept one algorithm's plan: the form comes back with the algorithm, batch size, patches
    per step and image size filled in, and the plan's token, so the task created keeps the plan."""
    token = values["plan_token"].strip()
    report = service.read_plan(settings, user, token) if token else None
    context = _form_context(session, settings, user, values)
    if report is None:
        context["errors"] = ["There is no finished plan to accept; press Plan first."]
        return render(request, "training/form.html", context, status_code=422)
    try:
        filled = plans.accepted_values(report, plan_algorithm)
    except ValueError as exc:
        context["errors"] = [str(exc)]
        context.update(_plan_context(report, token))
        return render(request, "training/form.html", context, status_code=422)
    context["values"] = {
        **values,
        **{
            k: "" if v is None else str(v)
            for k, v in filled.items()
            if k != "memory_budget_gib" or not values["memory_budget_gib"].strip()
        },
        "plan_token": token,
    }
    context.update(_plan_context(report, token, accepted=plan_algorithm))
    return render(request, "training/form.html", context)


@router.get("/tasks/{task_id:row_id}")
def task_page(
    request: Request, task_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """A task: status, live progress, memory, coverage, log, per-epoch charts and table, final
    metrics, actions."""
    task = service.get_task(session, user, task_id)
    context = _context(session, task)
    level = (task.hyperparameters or {}).get("pyramid_level")
    context["level"] = None
    if level is not None:
        dataset = session.get(Dataset, task.dataset_id)
        table = datasets.dataset_levels(settings, dataset) if dataset is not None else {}
        entries = table.get("levels") or []
        entry = entries[level] if isinstance(level, int) and 0 <= level < len(entries) else {}
        mpp = entry.get("mpp")
        context["level"] = {
            "level": level,
            "words": " · ".join([_size(entry), _mpp(*mpp) if mpp else "µm/px unknown"]) if entry else "",
        }
    return render(request, "training/detail.html", {"active": "tasks", **context})


def _count(raw: str | None) -> int:
    try:
        return max(0, min(int(raw or 0), 2**62))
    except ValueError:
        return 0


@router.get("/tasks/{task_id:row_id}/status")
async def task_status(request: Request, task_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """The status panel, polled while the task is queued or running: progress, memory, patch
    coverage, and out-of-band the epochs (``epochs``: how many the page has) and log lines (after
    ``event``) that are new. When the run has ended the page reloads itself (HX-Refresh) to show
    the results and the actions of an ended task."""
    # Polled by every open task page: one thread-pool hop reads, renders and ends the read-only
    # transaction (a plain ``def`` endpoint would take another hop to commit it afterwards).
    return await run_in_threadpool(_status_panel, request, session, user, task_id)


def _status_panel(request: Request, session: Any, user: Any, task_id: int) -> Response:
    task = service.get_task(session, user, task_id)
    context = _context(
        session,
        task,
        after_epoch=_count(request.query_params.get("epochs")),
        after_event=_count(request.query_params.get("event")),
    )
    headers = {} if context["active_run"] else {"HX-Refresh": "true"}
    response = render(request, "training/status.html", context, headers=headers)
    end_transaction(session)
    return response


#: Names shown for the download formats.
FORMAT_NAMES = {"safetensors": "safetensors", "torchscript": "TorchScript", "onnx": "ONNX"}


@router.get("/tasks/{task_id:row_id}/download/{fmt}")
def download_page(
    request: Request, task_id: RowId, fmt: str, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The model file from the task's page. A TorchScript or ONNX export a worker is still making
    sends the browser back to the page with a note to try again in a moment."""
    if fmt not in FORMAT_NAMES:
        raise NotFound(f"Unknown format {fmt!r}.")
    path = service.model_file(session, settings, user, task_id, fmt)
    if path is None:
        response = RedirectResponse(f"/tasks/{task_id}#downloads", status_code=303)
        flash(
            response,
            request,
            "warning",
            f"A worker is exporting the {FORMAT_NAMES[fmt]} model; download it again in a few seconds.",
        )
        return response
    return FileResponse(
        path, media_type=service.EXPORT_MEDIA_TYPES[fmt], filename=f"task-{task_id}-{path.name}"
    )


def _action(request: Request, task_id: int, text: str, target: str | None = None) -> Response:
    response = RedirectResponse(target or f"/tasks/{task_id}", status_code=303)
    flash(response, request, "success", text)
    return response


@router.post("/tasks/{task_id:row_id}/cancel")
def cancel_page(request: Request, task_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """Cancel from the task's page."""
    task = service.cancel_task(session, user, task_id)
    done = task.status.value == "cancelled"
    return _action(
        request, task_id, "Task cancelled." if done else "The worker stops the task at its next step."
    )


@router.post("/tasks/{task_id:row_id}/retry")
def retry_page(
    request: Request, task_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Retry from the task's page (resumes from the last checkpoint)."""
    service.retry_task(session, settings, user, task_id)
    return _action(request, task_id, "Task queued again; it resumes from its last checkpoint.")


@router.post("/tasks/{task_id:row_id}/clone")
def clone_page(
    request: Request,
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    algorithm: Annotated[str, Form()] = "",
) -> Response:
    """Clone from the task's page (optionally as the other algorithm)."""
    clone = service.clone_task(session, settings, user, task_id, algorithm or None)
    return _action(request, clone.id, f"Task {clone.name!r} is queued.")


@router.post("/tasks/{task_id:row_id}/delete")
def delete_page(
    request: Request, task_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Delete from the task's page."""
    name = service.get_task(session, user, task_id).name
    service.delete_task(session, settings, user, task_id)
    return _action(request, task_id, f"Task {name!r} deleted.", target="/tasks")


# Using the model: the prediction and evaluation panels of a task's page. Each section loads its
# panel with HTMX and the panel polls itself while one of its jobs is queued or running. The
# image upload goes to the streamed API route (frontend/static/js/predict.js, CSRF in the header).


def _bars(probabilities: dict[str, float]) -> list[dict[str, Any]]:
    """Class probabilities as SVG bars, most likely first."""
    ordered = sorted(probabilities.items(), key=lambda item: -item[1])
    return [{"name": name, "percent": round(100 * p, 1)} for name, p in ordered]


@router.get("/tasks/{task_id:row_id}/predictions/panel")
def predictions_panel(request: Request, task_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """The task's predictions: probabilities as bars, the heatmap over the thumbnail, errors."""
    task = service.get_task(session, user, task_id)
    rows = [PredictionRead.of(p) for p in predictions.list_predictions(session, task)]
    bars = {r.id: _bars(r.result.get("probabilities", {})) for r in rows if r.status == "succeeded"}
    context = {
        "task": task,
        "rows": rows,
        "bars": bars,
        "pending": any(r.status in predictions.ACTIVE_NAMES for r in rows),
    }
    return render(request, "training/predictions_panel.html", context)


@router.get("/tasks/{task_id:row_id}/evaluations/panel")
def evaluations_panel(request: Request, task_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """The task's evaluations and the form to start one on a ready dataset."""
    task = service.get_task(session, user, task_id)
    rows = [EvaluationRead.model_validate(e) for e in predictions.list_evaluations(session, task)]
    ready = [d for d in datasets.list_datasets(session, user) if d.status == DatasetStatus.READY]
    context = {
        "task": task,
        "rows": rows,
        "datasets": ready,
        "classes": predictions.task_classes(session, task),
        "pending": any(r.status in predictions.ACTIVE_NAMES for r in rows),
    }
    return render(request, "training/evaluations_panel.html", context)


@router.post("/tasks/{task_id:row_id}/evaluations")
def evaluate_from_form(
    request: Request,
    task_id: RowId,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    dataset_id: Annotated[str, Form()] = "",
) -> Response:
    """Start an evaluation from the task's page; a refusal is shown as a message on the page."""
    service.get_task(session, user, task_id)  # another user's task is a 404, not a message
    target = f"/tasks/{task_id}#evaluations"
    if not dataset_id.strip().isdigit():
        response = RedirectResponse(target, status_code=303)
        flash(response, request, "error", "Choose a dataset to evaluate on.")
        return response
    try:
        evaluation = predictions.create_evaluation(session, settings, user, task_id, int(dataset_id))
    except AppError as exc:
        response = RedirectResponse(target, status_code=303)
        flash(response, request, "error", str(exc.detail))
        return response
    return _action(request, task_id, f"Evaluating on {evaluation.dataset_name!r}…", target=target)
