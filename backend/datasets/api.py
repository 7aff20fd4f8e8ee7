"""Dataset routes under /api/v1: streamed upload, list, read, delete, thumbnails.

Routes parse, call one service function, and return; the request owns the transaction (the
upload, which streams, uses short transactions of its own: see ``uploads``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, Security, status
from fastapi.responses import FileResponse

from backend import paths  # noqa: F401  (registers the ``row_id`` path convertor)
from backend.datasets import resumable, service
from backend.datasets.schemas import DatasetDeleted, DatasetImport, DatasetRead
from backend.datasets.uploads import receive_dataset_upload
from backend.deps import MAX_ROW_ID, AdminUser, CurrentUser, RowId, SessionDep, SettingsDep, oauth2_scheme
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


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    responses={
        400: {"model": ErrorResponse, "description": "The path is refused (outside the import root, ...)."},
        403: {"model": ErrorResponse, "description": "Imports are disabled (`TESSERA_IMPORT_ROOT` empty)."},
        404: {"model": ErrorResponse, "description": "Not an administrator."},
    },
)
def import_dataset(
    body: DatasetImport, admin: AdminUser, session: SessionDep, settings: SettingsDep
) -> DatasetRead:
    """Import a dataset from a file or folder under the server's import root (administrators only).

    `path` is relative to `TESSERA_IMPORT_ROOT`: an archive, a single image or slide, or a
    dataset folder. Files are hard-linked, not copied, where the filesystem allows (`summary.import`
    says which); answers 201 with `status: "validating"` like an upload. Imports do not count
    against the owner's quota. Deleting the dataset never touches the source.
    """
    dataset = service.import_dataset(session, settings, admin, body.name, body.path, body.owner)
    return DatasetRead.of(dataset)


@router.get("", response_model=list[DatasetRead])
def list_datasets(user: CurrentUser, session: SessionDep) -> list[DatasetRead]:
    """Your datasets, newest first."""
    return [DatasetRead.of(d) for d in service.list_datasets(session, user)]


@router.get("/{dataset_id:row_id}", response_model=DatasetRead, responses={404: {"model": ErrorResponse}})
def read_dataset(dataset_id: RowId, user: CurrentUser, session: SessionDep) -> DatasetRead:
    """One of your datasets: status, validation progress, summary or problems."""
    return DatasetRead.of(service.get_dataset(session, user, dataset_id))


@router.delete(
    "/{dataset_id:row_id}",
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
    "/{dataset_id:row_id}/thumbnails/{index}",
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


# Resumable uploads (tus 1.0: core, creation, termination); see backend/datasets/resumable.py.


def _tus_parameter(name: str, description: str, *, required: bool = True, integer: bool = False) -> dict:
    schema: dict = {"type": "integer", "minimum": 0} if integer else {"type": "string"}
    return {"name": name, "in": "header", "required": required, "schema": schema, "description": description}


_TUS_VERSION = _tus_parameter("Tus-Resumable", "Always `1.0.0`.")
_TUS_ERRORS = {
    400: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse, "description": "Upload-Offset is not the stored offset."},
    412: {"model": ErrorResponse, "description": "Another tus version."},
    413: {"model": ErrorResponse, "description": "Over the upload size limit or the storage quota."},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    response_class=Response,
    dependencies=[Security(oauth2_scheme)],
    responses={201: {"description": "Created; `Location` is the upload's URL."}, **_TUS_ERRORS},
    openapi_extra={
        "parameters": [
            _TUS_VERSION,
            _tus_parameter("Upload-Length", "Size of the whole file, in bytes.", integer=True),
            _tus_parameter(
                "Upload-Metadata",
                "`name <base64>,filename <base64>`: the dataset name and the file's name.",
                required=False,
            ),
        ]
    },
)
async def create_resumable_upload(request: Request, settings: SettingsDep) -> Response:
    """Start a resumable upload (tus creation): the dataset is created with status `uploading`
    and its declared length reserved in your quota. Send the bytes with `PATCH` to `Location`."""
    dataset_id, location = await resumable.create_upload(request, settings)
    return Response(
        status_code=201, headers=resumable.tus_headers(Location=location, **{"Dataset-Id": str(dataset_id)})
    )


@router.head(
    "/uploads/{dataset_id:row_id}",
    response_class=Response,
    dependencies=[Security(oauth2_scheme)],
    responses={200: {"description": "`Upload-Offset` and `Upload-Length` headers."}, **_TUS_ERRORS},
)
async def resumable_upload_offset(dataset_id: RowId, request: Request, settings: SettingsDep) -> Response:
    """How many bytes of the upload are stored (tus `HEAD`): resume from `Upload-Offset`."""
    offset, length = await resumable.upload_offset(request, settings, dataset_id)
    return Response(
        status_code=200,
        headers=resumable.tus_headers(**{"Upload-Offset": str(offset), "Upload-Length": str(length)}),
    )


@router.patch(
    "/uploads/{dataset_id:row_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    dependencies=[Security(oauth2_scheme)],
    responses={204: {"description": "Appended; `Upload-Offset` is the new offset."}, **_TUS_ERRORS},
    openapi_extra={
        "parameters": [_TUS_VERSION, _tus_parameter("Upload-Offset", "The stored offset.", integer=True)],
        "requestBody": {
            "required": True,
            "content": {
                "application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
    },
)
async def append_resumable_upload(dataset_id: RowId, request: Request, settings: SettingsDep) -> Response:
    """Append bytes at `Upload-Offset` (tus `PATCH`). The last byte ends the upload: the dataset
    becomes `validating` and a worker checks it."""
    offset = await resumable.append_chunk(request, settings, dataset_id)
    return Response(status_code=204, headers=resumable.tus_headers(**{"Upload-Offset": str(offset)}))


@router.delete(
    "/uploads/{dataset_id:row_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    dependencies=[Security(oauth2_scheme)],
    responses=_TUS_ERRORS,
    openapi_extra={"parameters": [_TUS_VERSION]},
)
async def terminate_resumable_upload(dataset_id: RowId, request: Request, settings: SettingsDep) -> Response:
    """Abandon an unfinished upload (tus termination): its dataset and bytes are removed."""
    await resumable.terminate_upload(request, settings, dataset_id)
    return Response(status_code=204, headers=resumable.tus_headers())
