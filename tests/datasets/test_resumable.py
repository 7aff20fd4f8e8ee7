"""Resumable uploads (tus 1.0): an upload stopped at 50% and resumed from HEAD's offset gives a
byte-identical file; offsets, ownership, the size limit, the quota and termination are enforced."""

from __future__ import annotations

import base64
import hashlib

import anyio
from sqlalchemy import select

from backend.db import session_scope
from backend.models import Dataset
from tests.datasets.helpers import good_zip
from worker.tasks.datasets import validate_dataset

TUS = {"Tus-Resumable": "1.0.0"}


def metadata(name: str, filename: str) -> str:
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    return f"name {b64(name)},filename {b64(filename)}"


def create(client, auth, length: int, name: str = "pets"):
    return client.post(
        "/api/v1/datasets/uploads",
        headers={**auth, **TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(name, "pets.zip")},
    )


def patch(client, auth, location: str, offset: int, data: bytes):
    return client.patch(
        location,
        content=data,
        headers={
            **auth,
            **TUS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        },
    )


def test_an_upload_interrupted_at_half_resumes_to_a_byte_identical_file(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    archive = good_zip(per_class=4)
    half = len(archive) // 2
    created = create(client, auth, len(archive))
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    dataset_id = int(location.rsplit("/", 1)[1])
    assert client.get(f"/api/v1/datasets/{dataset_id}", headers=auth).json()["status"] == "uploading"

    first = patch(client, auth, location, 0, archive[:half])
    assert first.status_code == 204 and first.headers["Upload-Offset"] == str(half)
    # The connection is gone; a client that guesses a wrong offset is told the stored one.
    wrong = patch(client, auth, location, 0, archive[half:])
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == str(half)
    head = client.request("HEAD", location, headers={**auth, **TUS})
    assert head.status_code == 200
    assert head.headers["Upload-Offset"] == str(half) and head.headers["Upload-Length"] == str(len(archive))

    rest = patch(client, auth, location, half, archive[half:])
    assert rest.status_code == 204 and rest.headers["Upload-Offset"] == str(len(archive))
    stored = settings.data_dir / "datasets" / str(dataset_id) / "upload"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(archive).hexdigest()
    body = client.get(f"/api/v1/datasets/{dataset_id}", headers=auth).json()
    assert body["status"] == "validating" and body["sha256"] == hashlib.sha256(archive).hexdigest()
    # A finished upload takes no more bytes.
    assert patch(client, auth, location, len(archive), b"x").status_code == 404
    assert validate_dataset(settings, dataset_id) == "ready"


def test_tus_rules_owner_limits_quota_and_termination(client, make_user, bearer, settings, make_client):
    owner, other = bearer(client, make_user()), bearer(client, make_user())
    location = create(client, owner, 100).headers["Location"]
    assert client.request("HEAD", location, headers={**other, **TUS}).status_code == 404
    assert patch(client, other, location, 0, b"x" * 10).status_code == 404
    assert client.delete(location, headers={**other, **TUS}).status_code == 404
    assert patch(client, owner, location, 0, b"x" * 101).status_code == 400  # past Upload-Length
    no_version = patch(client, owner, location, 0, b"x")
    assert client.patch(location, content=b"x", headers={**owner, "Upload-Offset": "0"}).status_code == 412
    assert no_version.status_code == 204  # with the version header, one byte is appended
    wrong_type = client.patch(
        location, content=b"x", headers={**owner, **TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    assert client.delete(location, headers={**owner, **TUS}).status_code == 204
    with session_scope(settings) as session:
        assert session.scalars(select(Dataset)).all() == []
    assert not (settings.data_dir / "datasets" / location.rsplit("/", 1)[1]).exists()

    limited = make_client(settings.model_copy(update={"max_upload_bytes": 1000, "dataset_quota_bytes": 1500}))
    auth = bearer(limited, make_user())
    assert create(limited, auth, 1001).status_code == 413
    assert create(limited, auth, 1000).status_code == 201  # reserves 1000 of the 1500
    refused = create(limited, auth, 600)
    assert refused.status_code == 413 and refused.json()["error"] == "quota_exceeded"


def test_tus_from_a_browser_needs_the_csrf_header(client, make_user, login):
    token = login(client, make_user())
    assert create(client, {}, 10).status_code == 403
    assert create(client, {"X-CSRF-Token": token}, 10).status_code == 201


def _send_then_drop(
    app, method: str, path: str, headers: dict[str, str], body: bytes, keep: int
) -> list[dict]:
    """Call the ASGI app the way a server does for a client whose connection drops after ``keep``
    bytes of ``body``: the chunks arrive, then ``http.disconnect``. Returns what the app sent."""
    chunks = [body[i : i + 65536] for i in range(0, keep, 65536)]
    chunks[-1] = chunks[-1][: keep - 65536 * (len(chunks) - 1)]
    messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    anyio.run(app, scope, receive, send)
    return sent


def test_a_patch_cut_off_mid_body_keeps_what_arrived_and_resumes(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    archive = good_zip(per_class=6) + b""  # a few hundred KiB: several chunks
    half = len(archive) // 2
    location = create(client, auth, len(archive)).headers["Location"]
    headers = {
        **auth,
        **TUS,
        "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream",
        "Content-Length": str(len(archive)),
    }
    _send_then_drop(client.app, "PATCH", location, headers, archive, half)

    head = client.request("HEAD", location, headers={**auth, **TUS})
    assert head.headers["Upload-Offset"] == str(half)  # every byte that arrived was kept
    rest = patch(client, auth, location, half, archive[half:])
    assert rest.status_code == 204
    stored = settings.data_dir / "datasets" / location.rsplit("/", 1)[1] / "upload"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(archive).hexdigest()


def test_a_multipart_upload_cut_off_leaves_nothing(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    boundary = "cut-off"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\npets\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.zip"\r\n\r\n'
    ).encode() + good_zip(per_class=6)
    headers = {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    sent = _send_then_drop(client.app, "POST", "/api/v1/datasets", headers, body, len(body) // 2)
    assert sent[0]["status"] == 400  # not a 500: a dropped connection is no server error
    with session_scope(settings) as session:
        assert session.scalars(select(Dataset)).all() == []
    root = settings.data_dir / "datasets"
    assert not root.exists() or list(root.iterdir()) == []


def test_stale_uploads_are_pruned_and_others_kept(client, make_user, bearer, settings):
    from datetime import timedelta

    from backend.datasets import service
    from backend.models.base import utcnow
    from worker.celery_app import beat_schedule

    assert "datasets.prune_uploads" in beat_schedule(settings)
    auth = bearer(client, make_user())
    location = create(client, auth, 1000).headers["Location"]
    assert patch(client, auth, location, 0, b"x" * 10).status_code == 204
    finished = client.post(
        "/api/v1/datasets", data={"name": "kept"}, files={"file": ("k.zip", good_zip())}, headers=auth
    ).json()["id"]
    with session_scope(settings) as session:
        assert service.prune_stale_uploads(session, settings) == []  # received bytes just now
    later = utcnow() + timedelta(hours=settings.stale_upload_hours, minutes=1)
    with session_scope(settings) as session:
        removed = service.prune_stale_uploads(session, settings, now=later)
    assert removed == [int(location.rsplit("/", 1)[1])]
    with session_scope(settings) as session:
        assert [d.id for d in session.scalars(select(Dataset))] == [finished]
    assert not (settings.data_dir / "datasets" / str(removed[0])).exists()
