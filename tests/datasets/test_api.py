"""The datasets API on a real database: streamed upload, limits and quota, ownership, deletion,
and validation by the job's own code (``validate_dataset``, run in the test process)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.datasets import service
from backend.db import session_scope
from backend.models import Dataset, DatasetStatus
from tests.datasets.helpers import bad_zip, good_zip
from worker.tasks.datasets import validate_dataset


def upload(client, headers, data: bytes, name: str = "pets", filename: str = "pets.zip"):
    return client.post(
        "/api/v1/datasets",
        data={"name": name},
        files={"file": (filename, data, "application/zip")},
        headers=headers,
    )


def rows(settings) -> list[Dataset]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Dataset)))


def dataset_folders(settings) -> list[Path]:
    root = settings.data_dir / "datasets"
    return sorted(root.iterdir()) if root.exists() else []


def test_upload_streams_to_the_dataset_folder_and_validates(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    archive = good_zip()
    response = upload(client, auth, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating" and body["name"] == "pets"
    assert body["size_bytes"] == len(archive)
    assert body["sha256"] == hashlib.sha256(archive).hexdigest()
    stored = settings.data_dir / "datasets" / str(body["id"]) / "upload"
    assert stored.read_bytes() == archive

    assert validate_dataset(settings, body["id"]) == "ready"
    ready = client.get(f"/api/v1/datasets/{body['id']}", headers=auth).json()
    assert ready["status"] == "ready"
    assert ready["num_images"] == 6 and ready["num_classes"] == 2
    summary = ready["summary"]
    assert summary["classes"] == ["cat", "dog"] and summary["class_to_index"] == {"cat": 0, "dog": 1}
    assert summary["class_counts"] == {"cat": 3, "dog": 3}
    assert sum(summary["split_counts"]["train"].values()) >= 2
    assert summary["image_stats"]["width"]["min"] == 32
    assert ready["progress"]["phase"] == "done"
    report = (stored.parent / "report.json").read_text()
    assert '"splits"' in report and "cat/0.png" in report
    first = summary["thumbnails"][0]
    thumb = client.get(f"/api/v1/datasets/{body['id']}/thumbnails/{first['index']}", headers=auth)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:3] == b"\xff\xd8\xff"
    assert client.get(f"/api/v1/datasets/{body['id']}/thumbnails/999", headers=auth).status_code == 404
    listed = client.get("/api/v1/datasets", headers=auth).json()
    assert [d["id"] for d in listed] == [body["id"]]


def test_a_bad_archive_ends_invalid_with_its_problems_and_no_extracted_files(
    client, make_user, bearer, settings
):
    auth = bearer(client, make_user())
    dataset_id = upload(client, auth, bad_zip()).json()["id"]
    assert validate_dataset(settings, dataset_id) == "invalid"
    body = client.get(f"/api/v1/datasets/{dataset_id}", headers=auth).json()
    assert body["status"] == "invalid"
    codes = {p["code"] for p in body["problems"]}
    assert {"unsupported_format", "content_mismatch", "too_few_classes"} <= codes
    assert all(p["hint"] for p in body["problems"])
    folder = settings.data_dir / "datasets" / str(dataset_id)
    assert not (folder / "images").exists() and (folder / "report.json").is_file()
    # A redelivered message does not validate a finished dataset again.
    assert validate_dataset(settings, dataset_id) == "skipped"


def test_an_oversized_upload_is_413_and_leaves_nothing(client, make_user, bearer, settings, make_client):
    small = settings.model_copy(update={"max_upload_bytes": 4096})
    limited = make_client(small)
    auth = bearer(limited, make_user())
    response = upload(limited, auth, b"x" * 20_000)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large" and "4.0 KiB" in response.json()["detail"]
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_an_oversized_upload_without_length_is_stopped_while_streaming(
    client, make_user, bearer, settings, make_client
):
    small = settings.model_copy(update={"max_upload_bytes": 100_000})
    limited = make_client(small)
    auth = bearer(limited, make_user())
    boundary = "----tessera-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()

    async def body():  # no Content-Length: the limit can only be seen as bytes arrive
        yield head
        for _ in range(400):
            yield b"y" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = limited.post(
        "/api/v1/datasets",
        content=body(),
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413, response.text
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_the_quota_counts_every_dataset_of_the_owner(client, make_user, bearer, settings, make_client):
    archive = good_zip()
    quota = settings.model_copy(update={"dataset_quota_bytes": int(len(archive) * 1.5)})
    limited = make_client(quota)
    auth = bearer(limited, make_user())
    assert upload(limited, auth, archive).status_code == 201
    second = upload(limited, auth, archive, name="again")
    assert second.status_code == 413
    assert second.json()["error"] == "quota_exceeded" and "quota" in second.json()["detail"]
    assert len(rows(settings)) == 1 and len(dataset_folders(settings)) == 1
    # Another user has a quota of their own.
    assert upload(limited, bearer(limited, make_user()), archive).status_code == 201


def test_another_users_dataset_is_404_everywhere(client, make_user, bearer, settings):
    owner, other = bearer(client, make_user()), bearer(client, make_user())
    dataset_id = upload(client, owner, good_zip()).json()["id"]
    validate_dataset(settings, dataset_id)
    for method, path in (
        ("GET", f"/api/v1/datasets/{dataset_id}"),
        ("DELETE", f"/api/v1/datasets/{dataset_id}"),
        ("GET", f"/api/v1/datasets/{dataset_id}/thumbnails/0"),
        ("GET", f"/datasets/{dataset_id}"),
        ("GET", f"/datasets/{dataset_id}/status"),
    ):
        response = client.request(method, path, headers={**other, "Accept": "application/json"})
        assert response.status_code == 404, (method, path, response.status_code)
    assert client.get("/api/v1/datasets", headers=other).json() == []
    assert client.get(f"/api/v1/datasets/{dataset_id}/thumbnails/0", headers=owner).status_code == 200


def test_delete_removes_row_and_files(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    dataset_id = upload(client, auth, good_zip()).json()["id"]
    validate_dataset(settings, dataset_id)
    response = client.delete(f"/api/v1/datasets/{dataset_id}", headers=auth)
    assert response.status_code == 200 and response.json() == {"id": dataset_id, "status": "deleted"}
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_delete_during_validation_is_finished_by_the_worker(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    dataset_id = upload(client, auth, good_zip()).json()["id"]
    response = client.delete(f"/api/v1/datasets/{dataset_id}", headers=auth)
    assert response.json()["status"] == "deleting"
    assert client.get(f"/api/v1/datasets/{dataset_id}", headers=auth).status_code == 404
    assert client.get("/api/v1/datasets", headers=auth).json() == []
    assert validate_dataset(settings, dataset_id) == "deleted"
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_delete_requested_mid_validation_stops_the_job_and_cleans_up(client, make_user, bearer, settings):
    auth = bearer(client, make_user())
    dataset_id = upload(client, auth, good_zip(per_class=4)).json()["id"]
    calls = []
    original = service.deletion_requested

    def delete_once_started(app_settings, ident):  # the owner deletes after the job started
        if not calls:
            calls.append(ident)
            assert client.delete(f"/api/v1/datasets/{ident}", headers=auth).json()["status"] == "deleting"
        return original(app_settings, ident)

    service.deletion_requested = delete_once_started
    try:
        assert validate_dataset(settings, dataset_id) == "deleted"
    finally:
        service.deletion_requested = original
    assert calls == [dataset_id]
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_page_upload_needs_the_csrf_header(client, make_user, login, settings):
    user = make_user()
    token = login(client, user)
    refused = upload(client, {}, good_zip())
    assert refused.status_code == 403
    # The token as a form field is not read (it would come after the file in the stream).
    refused = client.post(
        "/api/v1/datasets",
        data={"name": "pets", "csrf_token": token},
        files={"file": ("pets.zip", good_zip(), "application/zip")},
    )
    assert refused.status_code == 403
    assert rows(settings) == []
    accepted = upload(client, {"X-CSRF-Token": token}, good_zip())
    assert accepted.status_code == 201


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"data": {"name": "x"}}, 400, "multipart/form-data"),
        ({"files": {"file": ("a.zip", b"PK", "application/zip")}}, 422, "no name"),
        ({"data": {"name": "x"}, "files": {"other": ("a.zip", b"PK", "application/zip")}}, 422, "no file"),
        ({"data": {"name": "   "}, "files": {"file": ("a.zip", b"PK", "application/zip")}}, 422, "name"),
    ],
)
def test_malformed_forms_are_refused_and_leave_nothing(
    client, make_user, bearer, settings, kwargs, status, message
):
    auth = bearer(client, make_user())
    response = client.post("/api/v1/datasets", headers=auth, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert rows(settings) == [] and dataset_folders(settings) == []


def test_status_enum_and_anonymous(client):
    assert client.get("/api/v1/datasets").status_code == 401
    assert client.post("/api/v1/datasets", files={"file": ("a", b"x")}).status_code == 401
    assert DatasetStatus.VALIDATING.value == "validating"
