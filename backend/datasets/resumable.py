"""Resumable dataset uploads: a compact tus 1.0 server (core, creation, termination).

Written here rather than taken from a package: the upload must belong to its owner (every
request is checked against the dataset row), count towards the owner's quota from the moment it
is created (the declared ``Upload-Length`` is reserved), land in the dataset's own folder, and
refuse a ``PATCH`` whose ``Upload-Offset`` is not the stored offset. The generic servers
available treat uploads as anonymous files in one folder with a global auth hook.

- ``POST /api/v1/datasets/uploads`` (``Upload-Length``, ``Upload-Metadata`` with ``name`` and
  ``filename``) creates the dataset row (status ``uploading``) and answers 201 with ``Location``.
- ``HEAD <location>`` answers the stored offset (the size of the file on disk).
- ``PATCH <location>`` (``application/offset+octet-stream``) appends at ``Upload-Offset``; an
  interrupted PATCH keeps what arrived, and the client resumes from ``HEAD``'s offset. The last
  byte finalises the upload: SHA-256 of the whole file, then ``datasets.validate`` is enqueued.
- ``DELETE <location>`` abandons an unfinished upload (row and file).

One PATCH at a time per upload: an exclusive ``flock`` on the file (another gets 409). A browser
authenticates with its session cookie and the ``X-CSRF-Token`` header on every unsafe request.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import os
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from backend.config import Settings
from backend.datasets import service
from backend.datasets.uploads import authenticate_upload
from backend.db import session_scope
from backend.errors import AppError, Conflict, Invalid, NotFound
from backend.models import Dataset, DatasetStatus

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination"
UPLOADS_PATH = "/api/v1/datasets/uploads"
#: Received bytes are written in blocks of this size.
WRITE_BLOCK_BYTES = 1 << 20


class TusVersionMismatch(AppError):
    """The client speaks another tus version."""

    status_code = 412
    code = "tus_version"
    default_detail = f"Only tus {TUS_VERSION} is supported (Tus-Resumable: {TUS_VERSION})."


class UnsupportedMediaType(AppError):
    """A PATCH body that is not ``application/offset+octet-stream``."""

    status_code = 415
    code = "unsupported_media_type"
    default_detail = "Send upload chunks as application/offset+octet-stream."


def tus_headers(**extra: str) -> dict[str, str]:
    """The headers every tus answer carries, plus ``extra``."""
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def check_version(value: str | None) -> None:
    if value != TUS_VERSION:
        raise TusVersionMismatch(headers={"Tus-Version": TUS_VERSION})


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata: name base64,filename base64`` → ``{"name": ..., "filename": ...}``."""
    metadata: dict[str, str] = {}
    for pair in (header or "").split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition(" ")
        try:
            metadata[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Invalid(f"Upload-Metadata {key!r} is not base64 of UTF-8 text.") from None
    return metadata


def _own_upload(settings: Settings, user_id: int, dataset_id: int) -> Dataset:
    """The caller's dataset ``dataset_id`` still uploading (404 for anything else)."""
    with session_scope(settings) as session:
        dataset = session.get(Dataset, dataset_id)
        if (
            dataset is None
            or dataset.owner_id != user_id
            or dataset.delete_requested
            or dataset.status != DatasetStatus.UPLOADING
            or dataset.source != "upload"
        ):
            raise NotFound("No such upload.")
        session.expunge(dataset)
        return dataset


def _offset(settings: Settings, dataset_id: int) -> int:
    try:
        return service.upload_path(settings, dataset_id).stat().st_size
    except FileNotFoundError:
        raise NotFound("No such upload.") from None


def _create(settings: Settings, user_id: int, length: int, name: str, filename: str) -> int:
    with session_scope(settings) as session:
        service.check_upload_size(settings, service.storage_used(session, user_id), length)
        dataset = service.create_dataset(session, settings, user_id, name, filename)
        # The declared length is reserved in the quota until the upload ends or is abandoned.
        dataset.size_bytes = length
        dataset.progress_total = length
        dataset.progress_phase = "uploading"
        session.flush()
        dataset_id = dataset.id
    folder = service.dataset_dir(settings, dataset_id)
    folder.mkdir(parents=True, exist_ok=True)
    service.upload_path(settings, dataset_id).touch()
    return dataset_id


async def create_upload(request: Request, settings: Settings) -> tuple[int, str]:
    """tus creation: a new dataset row and empty file; returns the id and its Location."""
    caller = await run_in_threadpool(authenticate_upload, request, settings)
    check_version(request.headers.get("tus-resumable"))
    raw_length = request.headers.get("upload-length", "").strip()
    if not raw_length.isdigit():
        raise Invalid("Upload-Length is required (deferred lengths are not supported).")
    length = int(raw_length)
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    filename = service.clean_filename(metadata.get("filename", ""))
    name = service.clean_name(metadata.get("name") or filename.rsplit(".", 1)[0] or "dataset")
    dataset_id = await run_in_threadpool(_create, settings, caller.user_id, length, name, filename)
    return dataset_id, f"{UPLOADS_PATH}/{dataset_id}"


async def upload_offset(request: Request, settings: Settings, dataset_id: int) -> tuple[int, int]:
    """tus HEAD: the stored offset and the declared length of the caller's upload."""
    caller = await run_in_threadpool(authenticate_upload, request, settings)
    dataset = await run_in_threadpool(_own_upload, settings, caller.user_id, dataset_id)
    return _offset(settings, dataset_id), dataset.size_bytes


def _finalise(settings: Settings, dataset_id: int, length: int) -> None:
    digest = hashlib.sha256()
    with open(service.upload_path(settings, dataset_id), "rb") as handle:
        for block in iter(lambda: handle.read(WRITE_BLOCK_BYTES), b""):
            digest.update(block)
    with session_scope(settings) as session:
        service.finish_upload(session, settings, dataset_id, length, digest.hexdigest())


def _open_locked(settings: Settings, dataset_id: int) -> BinaryIO:
    handle = open(service.upload_path(settings, dataset_id), "ab")  # noqa: SIM115
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise Conflict("Another request is appending to this upload; resume from its offset.") from None
    return handle


def _append(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)
    handle.flush()


async def append_chunk(request: Request, settings: Settings, dataset_id: int) -> int:
    """tus PATCH: append the body at ``Upload-Offset``; returns the new offset. The last byte
    finalises the upload (hash, then validation is queued)."""
    caller = await run_in_threadpool(authenticate_upload, request, settings)
    check_version(request.headers.get("tus-resumable"))
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/offset+octet-stream":
        raise UnsupportedMediaType()
    raw_offset = request.headers.get("upload-offset", "").strip()
    if not raw_offset.isdigit():
        raise Invalid("Upload-Offset is required.")
    dataset = await run_in_threadpool(_own_upload, settings, caller.user_id, dataset_id)
    length = dataset.size_bytes
    handle = await run_in_threadpool(_open_locked, settings, dataset_id)
    try:
        offset = os.fstat(handle.fileno()).st_size
        if int(raw_offset) != offset:
            raise Conflict(
                f"Upload-Offset {raw_offset} is not the stored offset {offset}: resume from HEAD's offset.",
                headers=tus_headers(**{"Upload-Offset": str(offset)}),
            )
        pending = bytearray()
        async for chunk in request.stream():
            if offset + len(pending) + len(chunk) > length:
                raise Invalid(f"The upload is longer than its declared Upload-Length of {length} bytes.")
            pending += chunk
            if len(pending) >= WRITE_BLOCK_BYTES:
                await run_in_threadpool(_append, handle, bytes(pending))
                offset += len(pending)
                pending.clear()
        if pending:
            await run_in_threadpool(_append, handle, bytes(pending))
            offset += len(pending)
    except ClientDisconnect:
        # The connection broke: keep every byte that arrived; the client resumes after them (the
        # answer below reaches nobody, but a dropped connection is no server error to log).
        if pending:
            _append(handle, bytes(pending))
            offset += len(pending)
        handle.close()
        _touch(settings, dataset_id, offset)
        return offset
    except BaseException:
        handle.close()
        raise
    handle.close()
    await run_in_threadpool(_touch, settings, dataset_id, offset)
    if offset == length:
        await run_in_threadpool(_finalise, settings, dataset_id, length)
    return offset


def _touch(settings: Settings, dataset_id: int, offset: int) -> None:
    with session_scope(settings) as session:
        service.touch_upload(session, dataset_id, offset)


async def terminate_upload(request: Request, settings: Settings, dataset_id: int) -> None:
    """tus termination: abandon the caller's unfinished upload (row and file)."""
    caller = await run_in_threadpool(authenticate_upload, request, settings)
    check_version(request.headers.get("tus-resumable"))
    await run_in_threadpool(_own_upload, settings, caller.user_id, dataset_id)
    await run_in_threadpool(service.discard_upload, settings, dataset_id)
