"""Dataset routes under /api/v1: streamed upload, list, read, delete, thumbnails.

Routes parse, call one service function, and return; the request owns the transaction (the
upload, which streams, uses short transactions of its own: see ``uploads``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Security, status
from fastapi.responses import FileResponse

from backend.datasets import service
from backend.datasets.schemas import DatasetDeleted, DatasetRead
from backend.datasets.uploads import receive_dataset_upload
from backend.deps import MAX_ROW_ID, CurrentUser, RowId, SessionDep, SettingsDep, oauth2_scheme
from backend.errors import ErrorResponse
from backend.models import DATASET_NAME_MAX_LENGTH

router = APIRouter(prefix="/datasets", tags=["datasets"], responses={401: {"model": ErrorResponse}})

#: The upload form as the schema documents it (the route reads the body as a stream itself).
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "file"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": DATASET_NAME_MAX_LENGTH},
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "A .zip or .tar(.gz/.bz2/.xz) archive of labelled images, "
                        "or a single image or slide.",
                    },
                },
            }
        }
    },
}

ThumbnailIndex = Annotated[int, Path(ge=0, le=MAX_ROW_ID)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    openapi_extra={"requestBody": UPLOAD_BODY},
    dependencies=[Security(oauth2_scheme)],
    responses={
        400: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse, "description": "Over the upload size limit or the storage quota."},
        422: {"model": ErrorResponse, "description": "The name or the file field is missing or invalid."},
    },
)
async def upload_dataset(request: Request, settings: SettingsDep) -> DatasetRead:
    """Upload a dataset (multipart fields `name` and `file`), streamed to disk; answers 201 with
    `status: "validating"`, and a worker validates it (poll `GET /datasets/{id}`).

    From a signed-in browser, send the session's CSRF token in the `X-CSRF-Token` header.
    Over `max_upload_bytes`, or over the owner's `dataset_quota_bytes`, the answer is 413 and
    nothing is kept.
    """
    dataset = await receive_dataset_upload(request, settings)
    return DatasetRead.of(dataset)


@router.get("", response_model=list[DatasetRead])
def list_datasets(user: CurrentUser, session: SessionDep) -> list[DatasetRead]:
    """Your datasets, newest first."""
    return [DatasetRead.of(d) for d in service.list_datasets(session, user)]


@router.get("/{dataset_id}", response_model=DatasetRead, responses={404: {"model": ErrorResponse}})
def read_dataset(dataset_id: RowId, user: CurrentUser, session: SessionDep) -> DatasetRead:
    """One of your datasets: status, validation progress, summary or problems."""
    return DatasetRead.of(service.get_dataset(session, user, dataset_id))


@router.delete(
    "/{dataset_id}",
    response_model=DatasetDeleted,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def delete_dataset(
    dataset_id: RowId, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> DatasetDeleted:
    """Delete one of your datasets and its files. While it validates, the answer is
    `deleting`: the worker stops and removes it. A dataset a task uses is refused (409)."""
    gone = service.delete_dataset(session, settings, user, dataset_id)
    return DatasetDeleted(id=dataset_id, status="deleted" if gone else "deleting")


@router.get(
    "/{dataset_id}/thumbnails/{index}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
        404: {"model": ErrorResponse},
    },
)
def read_thumbnail(
    dataset_id: RowId, index: ThumbnailIndex, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """Thumbnail `index` of a ready dataset (JPEG; the summary's `thumbnails` lists them)."""
    dataset = service.get_dataset(session, user, dataset_id)
    path = service.thumbnail_file(settings, dataset, index)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
