"""Backbone routes under /api/v1: list, upload, read, delete.

The upload streams its multipart body itself (the request body limit exempts the path and
``max_weights_upload_bytes`` governs it), so a browser session must send its CSRF token in the
``X-CSRF-Token`` header: the form is never parsed to look for it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from backend import (
    csrf,
    paths,  # noqa: F401  (registers the ``row_id`` path convertor)
)
from backend.accounts.login import Principal
from backend.backbones import service
from backend.backbones.schemas import BackboneRead
from backend.backbones.uploads import receive_upload
from backend.deps import CurrentUser, OptionalPrincipal, RowId, SessionDep, SettingsDep
from backend.errors import ErrorResponse, Forbidden, Unauthorized
from backend.models import User

router = APIRouter(prefix="/backbones", tags=["backbones"], responses={401: {"model": ErrorResponse}})

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "architecture", "file"],
                "properties": {
                    "name": {"type": "string", "maxLength": 100},
                    "architecture": {"type": "string", "description": "A catalog name, e.g. resnet18."},
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": ".safetensors, or a torch.save state dict (.pt, .pth, .bin).",
                    },
                },
            }
        }
    },
}


def streamed_upload_user(request: Request, principal: OptionalPrincipal) -> User:
    """The caller of a streamed upload; a browser session's CSRF token must be in the header."""
    if principal is None:
        raise Unauthorized(headers={"WWW-Authenticate": "Bearer"})
    _check_header_csrf(request, principal)
    return principal.user


def _check_header_csrf(request: Request, principal: Principal) -> None:
    if principal.session is None:
        return
    if not csrf.matches(principal.session.csrf_secret, request.headers.get(csrf.CSRF_HEADER, "")):
        raise Forbidden(
            "The upload did not carry this session's CSRF token in the X-CSRF-Token header. "
            "Reload the page and try again."
        )


@router.get("", response_model=list[BackboneRead])
def list_backbones(session: SessionDep, settings: SettingsDep, user: CurrentUser) -> list[BackboneRead]:
    """The built-in backbones of the catalog, then your uploads (newest first)."""
    service.ensure_builtins(session, settings)
    memory = service.memory_by_architecture(session)
    return [BackboneRead.of(row, memory.get(row.architecture)) for row in service.list_visible(session, user)]


@router.post(
    "",
    response_model=BackboneRead,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        400: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    },
)
async def upload_backbone(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: Annotated[User, Depends(streamed_upload_user)],
) -> BackboneRead:
    """Upload weights for a catalog architecture (multipart: `name`, `architecture`, `file`).

    The file is streamed to disk and hashed; the backbone starts as `validating` while a worker
    checks it (a strict load into the architecture and one forward pass). Pickled models,
    TorchScript archives and anything that would run code are refused then, with what to
    upload instead.
    """
    received = await receive_upload(request, settings.data_dir, settings.max_weights_upload_bytes)
    row = service.create_upload(session, settings, user, received)
    return BackboneRead.of(row, service.memory_of(session, row))


@router.get("/{backbone_id:row_id}", response_model=BackboneRead, responses={404: {"model": ErrorResponse}})
def read_backbone(
    backbone_id: RowId, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> BackboneRead:
    """One backbone: a built-in one or one of yours."""
    service.ensure_builtins(session, settings)
    row = service.get_visible(session, user, backbone_id)
    return BackboneRead.of(row, service.memory_of(session, row))


@router.delete(
    "/{backbone_id:row_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def delete_backbone(
    backbone_id: RowId, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> Response:
    """Delete one of your uploads and its file. Built-in backbones cannot be deleted (403); a
    backbone a training task uses is refused (409)."""
    service.delete_backbone(session, settings, user, backbone_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
