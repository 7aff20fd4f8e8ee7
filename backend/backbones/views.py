"""Backbone pages: the catalog and your uploads, the upload form, one backbone's page."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from backend import paths  # noqa: F401  (registers the ``row_id`` path convertor)
from backend.backbones import service
from backend.deps import CurrentUser, RowId, SessionDep, SettingsDep
from backend.models import BackboneStatus
from backend.ui.templating import flash, is_htmx, render

router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/backbones")
def backbones_page(
    request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Built-in backbones with their memory figures, your uploads, and the upload form."""
    service.ensure_builtins(session, settings)
    rows = service.list_visible(session, user)
    pending = any(
        r.status == BackboneStatus.VALIDATING
        or (r.owner_id is None and not {"memory", "measure_error"} & set(r.details or {}))
        for r in rows
    )
    context = {
        "active": "backbones",
        "pending": pending,
        "builtins": [r for r in rows if r.owner_id is None],
        "uploads": [r for r in rows if r.owner_id is not None],
        "architectures": sorted({r.architecture for r in rows if r.owner_id is None}),
        "max_upload_bytes": settings.max_weights_upload_bytes,
        "suffixes": ",".join(service.WEIGHTS_SUFFIXES),
    }
    if is_htmx(request):
        return render(request, "backbones/_tables.html", context)
    return render(request, "backbones/list.html", context)


@router.get("/backbones/{backbone_id:row_id}")
def backbone_page(
    request: Request, backbone_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """One backbone: status, what validation did, problems; polls itself while work is pending."""
    service.ensure_builtins(session, settings)
    row = service.get_visible(session, user, backbone_id)
    memory = service.memory_of(session, row)
    builtin = row if row.owner_id is None else service.builtin_for(session, row.architecture)
    measuring = memory is None and builtin is not None and "measure_error" not in (builtin.details or {})
    pending = row.status == BackboneStatus.VALIDATING or measuring
    context = {"active": "backbones", "backbone": row, "memory": memory, "pending": pending}
    if is_htmx(request):
        return render(request, "backbones/_status.html", context)
    return render(request, "backbones/detail.html", context)


@router.post("/backbones/{backbone_id:row_id}/delete")
def delete_backbone(
    request: Request, backbone_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Delete one of your uploads (form post with the CSRF token) and go back to the list."""
    service.delete_backbone(session, settings, user, backbone_id)
    response = RedirectResponse("/backbones", status_code=303)
    flash(response, request, "success", "The backbone was deleted.")
    return response
