"""Streamed multipart upload of a dataset: bytes go to disk chunk by chunk, hashed as they pass.

``POST /api/v1/datasets`` takes a ``multipart/form-data`` body with a ``name`` field and a ``file``
part. The body is read with ``request.stream()`` and cut with python-multipart's streaming parser,
never spooled whole by Starlette: the file part is written to ``<data_dir>/datasets/<id>/upload``
in blocks of :data:`WRITE_BLOCK_BYTES` while SHA-256 is computed. The size limit
(``max_upload_bytes``) and the owner's quota (``dataset_quota_bytes``) are checked before the body
is read (against ``Content-Length``) and again as bytes arrive; a refused or interrupted upload
leaves neither row nor file behind.

Authentication is the usual bearer token or session cookie; a cookie-authenticated upload must
carry the session's CSRF token in the ``X-CSRF-Token`` header (a form field would sit after the
file in the stream). The database is used in short transactions only (who is calling; create
the row; finish), never held open while the bytes flow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from backend import csrf
from backend.accounts.login import resolve_principal
from backend.config import Settings
from backend.datasets import service
from backend.db import session_scope
from backend.errors import Forbidden, Invalid, Unauthorized
from backend.models import Dataset

#: Received bytes are written to disk in blocks of this size (one thread hop per block).
WRITE_BLOCK_BYTES = 1 << 20
#: Largest text field (``name``) and number of parts accepted in the form.
MAX_FIELD_BYTES = 4096
MAX_PARTS = 8
#: Multipart overhead allowed on top of ``max_upload_bytes`` when checking ``Content-Length``.
ENVELOPE_SLACK_BYTES = 64 * 1024


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None


class _FormStream:
    """python-multipart callbacks that collect text fields and hand file bytes to the caller."""

    def __init__(self, boundary: bytes) -> None:
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        self.fields: dict[str, bytearray] = {}
        self.part = _Part()
        self.parts = 0
        self.file_started = False
        self.file_ended = False
        self.filename = ""
        self.pending = bytearray()  # file bytes parsed but not yet written
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._in_file = False

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise Invalid(f"The multipart body could not be parsed: {exc}") from None

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Invalid(f"The form has more than {MAX_PARTS} parts; send the fields name and file.")
        self.part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.part.headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        self.part.filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        if self.part.name == "file":
            if self.file_started:
                raise Invalid("The form has more than one file part: upload one archive at a time.")
            self.file_started = True
            self._in_file = True
            self.filename = self.part.filename or ""
        else:
            self._in_file = False
            self.fields[self.part.name] = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending += data[start:end]
            return
        value = self.fields[self.part.name]
        value += data[start:end]
        if len(value) > MAX_FIELD_BYTES:
            raise Invalid(f"The form field {self.part.name!r} is longer than {MAX_FIELD_BYTES} bytes.")

    def _part_end(self) -> None:
        if self._in_file:
            self.file_ended = True
            self._in_file = False

    def _end(self) -> None:
        self.ended = True

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        return None if value is None else bytes(value).decode("utf-8", "replace")


@dataclass(frozen=True)
class _Caller:
    user_id: int
    used_bytes: int


def authenticate_upload(request: Request, settings: Settings) -> _Caller:
    """Who uploads (bearer token or cookie + CSRF header) and how much of the quota they use."""
    with session_scope(settings) as session:
        principal = resolve_principal(
            session,
            settings,
            authorization=request.headers.get("authorization"),
            session_cookie=request.cookies.get(settings.session_cookie_name),
        )
        if principal is None:
            raise Unauthorized(headers={"WWW-Authenticate": "Bearer"})
        if principal.session is not None and not csrf.matches(
            principal.session.csrf_secret, request.headers.get(csrf.CSRF_HEADER, "")
        ):
            raise Forbidden(
                "Uploads from a signed-in browser must carry the X-CSRF-Token header. "
                "Reload the page and try again."
            )
        return _Caller(principal.user.id, service.storage_used(session, principal.user.id))


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if content_type != b"multipart/form-data" or not boundary:
        raise Invalid("Send the dataset as multipart/form-data with the fields name and file.")
    return boundary


def _create_row(settings: Settings, user_id: int, name: str, filename: str) -> int:
    with session_scope(settings) as session:
        dataset = service.create_dataset(session, settings, user_id, name, filename)
        dataset_id = dataset.id
    service.dataset_dir(settings, dataset_id).mkdir(parents=True, exist_ok=True)
    return dataset_id


def _finish(settings: Settings, dataset_id: int, name: str, size: int, sha256: str) -> Dataset:
    with session_scope(settings) as session:
        dataset = service.finish_upload(session, settings, dataset_id, size, sha256)
        dataset.name = service.clean_name(name)
        session.flush()
        session.refresh(dataset)
        session.expunge(dataset)
    return dataset


def _write(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)


async def receive_dataset_upload(request: Request, settings: Settings) -> Dataset:
    """Stream the form into a new dataset's folder; return the committed row (status validating).

    Raises 400 (not a form, no file, no name), 401, 403 (CSRF), 413 (size limit or quota). On any
    failure, the client going away included, the row and the folder are removed.
    """
    caller = await run_in_threadpool(authenticate_upload, request, settings)
    boundary = _boundary(request)
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit():
        # The envelope (boundaries, the name field) is small: what is over that is over the limit.
        service.check_upload_size(settings, caller.used_bytes, max(0, int(declared) - ENVELOPE_SLACK_BYTES))
    form = _FormStream(boundary)
    dataset_id: int | None = None
    handle: BinaryIO | None = None
    digest = hashlib.sha256()
    size = 0
    try:
        async for chunk in request.stream():
            form.feed(chunk)
            if form.file_started and dataset_id is None:
                # The row comes first, so the bytes land in the dataset's own folder. A name sent
                # after the file is applied at the end; until then the file's name stands in.
                provisional = form.text("name") or form.filename or "dataset"
                dataset_id = await run_in_threadpool(
                    _create_row, settings, caller.user_id, provisional, form.filename
                )
                handle = open(service.upload_path(settings, dataset_id), "wb")  # noqa: SIM115
            if form.pending and (len(form.pending) >= WRITE_BLOCK_BYTES or form.file_ended or not chunk):
                block = bytes(form.pending)
                form.pending.clear()
                size += len(block)
                service.check_upload_size(settings, caller.used_bytes, size)
                digest.update(block)
                assert handle is not None
                await run_in_threadpool(_write, handle, block)
        if form.pending:
            block = bytes(form.pending)
            form.pending.clear()
            size += len(block)
            service.check_upload_size(settings, caller.used_bytes, size)
            digest.update(block)
            assert handle is not None
            await run_in_threadpool(_write, handle, block)
        if not form.ended:
            raise Invalid("The multipart body ended before its closing boundary.")
        if dataset_id is None or handle is None:
            raise service.FormInvalid("The form has no file part: send the archive in the field 'file'.")
        name = form.text("name")
        if name is None:
            raise service.FormInvalid("The form has no name field: give the dataset a name.")
        service.clean_name(name)
        await run_in_threadpool(handle.close)
        handle = None
        return await run_in_threadpool(_finish, settings, dataset_id, name, size, digest.hexdigest())
    except BaseException as exc:
        # Refused, malformed, or the client went away (ClientDisconnect, a cancelled request):
        # nothing of this upload may stay. Run inline: the task may be cancelled already.
        if handle is not None:
            handle.close()
            handle = None
        if dataset_id is not None:
            service.discard_upload(settings, dataset_id)
        if isinstance(exc, ClientDisconnect):
            # Nobody reads the answer; a dropped connection is not a server error to log.
            raise Invalid("The connection closed before the upload ended; nothing was kept.") from None
        raise
    finally:
        if handle is not None:
            handle.close()
