"""Dataset pages: the list, the upload page, a dataset's page (live progress while it validates),
and deletion. The upload page sends the archive to the streamed API route with the session's
CSRF token in a header (XHR, with progress, speed and time left).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from backend.datasets import service
from backend.datasets.schemas import DatasetRead
from backend.deps import CurrentUser, RowId, SessionDep, SettingsDep
from backend.ui.templating import flash, render

router = APIRouter(tags=["pages"], include_in_schema=False)


def _chart(summary: dict) -> list[dict]:
    """Bars of the class chart: name, count, width in percent of the largest class, split counts."""
    counts: dict[str, int] = summary.get("class_counts", {})
    largest = max(counts.values(), default=0) or 1
    splits: dict[str, dict[str, int]] = summary.get("split_counts", {})
    return [
        {
            "name": name,
            "count": count,
            "percent": round(100 * count / largest, 1),
            "splits": {split: splits.get(split, {}).get(name, 0) for split in ("train", "val", "test")},
        }
        for name, count in counts.items()
    ]


def _thumbnails_by_class(summary: dict) -> dict[str, list[dict]]:
    """Thumbnails grouped by class, in the classes' index order."""
    grouped: dict[str, list[dict]] = {name: [] for name in summary.get("classes", [])}
    for thumb in summary.get("thumbnails", []):
        grouped.setdefault(thumb.get("class") or "image", []).append(thumb)
    return {name: items for name, items in grouped.items() if items}


def _context(dataset) -> dict:
    view = DatasetRead.of(dataset)
    return {
        "dataset": view,
        "size": service.human_bytes(view.size_bytes),
        "chart": _chart(view.summary),
        "thumbs": _thumbnails_by_class(view.summary),
        "percent": round(100 * view.progress.done / view.progress.total) if view.progress.total else 0,
    }


@router.get("/datasets")
def datasets_page(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The user's datasets with status and size."""
    rows = [
        {"dataset": DatasetRead.of(d), "size": service.human_bytes(d.size_bytes)}
        for d in service.list_datasets(session, user)
    ]
    used = service.storage_used(session, user.id)
    return render(
        request,
        "datasets/list.html",
        {
            "active": "datasets",
            "rows": rows,
            "used": service.human_bytes(used),
            "quota": service.human_bytes(settings.dataset_quota_bytes),
        },
    )


@router.get("/datasets/new")
def upload_page(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> Response:
    """The upload form (XHR to ``POST /api/v1/datasets``, with a progress bar)."""
    used = service.storage_used(session, user.id)
    return render(
        request,
        "datasets/upload.html",
        {
            "active": "datasets",
            "max_upload": service.human_bytes(settings.max_upload_bytes),
            "max_upload_bytes": settings.max_upload_bytes,
            "left_bytes": max(0, settings.dataset_quota_bytes - used),
            "left": service.human_bytes(max(0, settings.dataset_quota_bytes - used)),
        },
    )


@router.get("/datasets/{dataset_id:row_id}")
def dataset_page(request: Request, dataset_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """A dataset: status and live progress, class chart, sizes, split, thumbnails, or problems."""
    dataset = service.get_dataset(session, user, dataset_id)
    return render(request, "datasets/detail.html", {"active": "datasets", **_context(dataset)})


@router.get("/datasets/{dataset_id:row_id}/status")
def dataset_status(request: Request, dataset_id: RowId, user: CurrentUser, session: SessionDep) -> Response:
    """The status panel, polled by the page while the dataset validates; once it is done, the
    page reloads itself (HX-Refresh) to show the results."""
    dataset = service.get_dataset(session, user, dataset_id)
    context = _context(dataset)
    headers = {} if context["dataset"].status.value == "validating" else {"HX-Refresh": "true"}
    return render(request, "datasets/status.html", context, headers=headers)


@router.post("/datasets/{dataset_id:row_id}/delete")
def delete_page(
    request: Request, dataset_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Delete from the dataset's page (the form carries the CSRF token)."""
    dataset = service.get_dataset(session, user, dataset_id)
    name = dataset.name
    gone = service.delete_dataset(session, settings, user, dataset_id)
    response = RedirectResponse("/datasets", status_code=303)
    text = f"Dataset {name!r} deleted." if gone else f"Dataset {name!r} is being deleted."
    flash(response, request, "success", text)
    return response
