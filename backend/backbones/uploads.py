"""Receiving a weights upload: the multipart body streamed to a temporary file, hashed, bounded.

The body is parsed chunk by chunk as it arrives (python-multipart), so a large file is never held
in memory; the file part goes to ``<data_dir>/backbones/incoming/<random>.part`` while its
SHA-256 is computed. Past ``max_weights_upload_bytes`` the upload stops with a 413 and the
temporary file is removed; so is it on any other failure.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from backend.errors import AppError, Invalid

#: Longest value of a text field of the upload form (name, architecture).
MAX_FIELD_BYTES = 4096
#: Most parts a weights upload may have (three fields are expected).
MAX_PARTS = 8
#: Multipart framing allowed on top of the file when a Content-Length is declared.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
INCOMING_DIR = "incoming"


class UploadTooLarge(AppError):
    """The uploaded file is over its limit."""

    status_code = 413
    code = "too_large"
    default_detail = "The file is too large."


@dataclass
class ReceivedUpload:
    """The form's text fields and the file part, stored in a temporary file."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    path: Path | None = None
    size: int = 0
    sha256: str = ""

    def discard(self) -> None:
        """Remove the temporary file (when the upload is refused)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def too_large_message(limit: int) -> str:
    """What a 413 says: the limit, in the unit people use."""
    return (
        f"The weights file is larger than the {limit / 1024**2:.0f} MiB accepted (max_weights_upload_bytes)."
    )


class _Receiver:
    """python-multipart callbacks that fill a :class:`ReceivedUpload`."""

    def __init__(
        self, incoming: Path, max_file_bytes: int, too_large: Callable[[int], str] = too_large_message
    ) -> None:
        self.incoming = incoming
        self.max_file_bytes = max_file_bytes
        self.too_large = too_large
        self.result = ReceivedUpload()
        self._digest = hashlib.sha256()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._parts = 0
        self._field_name: str | None = None
        self._field_value = bytearray()
        self._file: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise Invalid(f"The form has more than {MAX_PARTS} parts; send name, architecture and file.")
        self._headers = {}
        self._field_name = None
        self._field_value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise Invalid("Every part of the form needs a Content-Disposition with a field name.")
        self._field_name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._field_name != "file" or self._file is not None:
                raise Invalid("Send exactly one file, in the field named 'file'.")
            self.result.filename = Path(options[b"filename"].decode("utf-8", "replace")).name[:255]
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.result.path = self.incoming / f"{secrets.token_hex(16)}.part"
            self._file = self.result.path.open("xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None and self._field_name == "file" and not self._file.closed:
            self.result.size += len(chunk)
            if self.result.size > self.max_file_bytes:
                raise UploadTooLarge(self.too_large(self.max_file_bytes), headers={"Connection": "close"})
            self._digest.update(chunk)
            self._file.write(chunk)
            return
        self._field_value += chunk
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise Invalid(f"The field {self._field_name!r} is longer than {MAX_FIELD_BYTES} bytes.")

    def on_part_end(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
            self.result.sha256 = self._digest.hexdigest()
        elif self._field_name is not None:
            self.result.fields[self._field_name] = self._field_value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


async def receive_upload(
    request: Request,
    data_dir: Path,
    max_file_bytes: int,
    *,
    incoming: Path | None = None,
    too_large: Callable[[int], str] = too_large_message,
    expected_fields: str = "name, architecture and file",
) -> ReceivedUpload:
    """Stream the request's ``multipart/form-data`` body to disk; the caller owns the returned file.

    The file goes to ``incoming`` (default ``<data_dir>/backbones/incoming``); ``too_large`` words
    the 413 from the limit, ``expected_fields`` the 400 for a body that is not a form.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise Invalid(f"Send multipart/form-data with the fields {expected_fields}.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_file_bytes + MULTIPART_OVERHEAD_BYTES:
        # Refused before a byte of the body is read.
        raise UploadTooLarge(too_large(max_file_bytes), headers={"Connection": "close"})
    receiver = _Receiver(incoming or data_dir / "backbones" / INCOMING_DIR, max_file_bytes, too_large)
    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": receiver.on_part_begin,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if receiver.result.path is None or not receiver.result.sha256:
            raise Invalid("The form has no complete file in the field 'file'.")
    except AppError:
        receiver.close()
        receiver.result.discard()
        raise
    except Exception as exc:  # a malformed body (python-multipart raises several kinds), a lost client
        receiver.close()
        receiver.result.discard()
        raise Invalid(f"The upload could not be read as multipart/form-data: {exc}") from exc
    finally:
        receiver.close()
    return receiver.result
