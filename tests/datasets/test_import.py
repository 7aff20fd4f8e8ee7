"""Admin import of a dataset from a server folder (``TESSERA_IMPORT_ROOT``) on a real database:
hard links instead of copies, path refusals, the admin-only rule, and deletion that never
touches the source. Validation runs the job's own code (``validate_dataset``) in the test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.datasets.service import storage_used
from backend.db import session_scope
from backend.models import Dataset, Role
from tests.datasets.helpers import good_zip
from tests.datasets_worker.builders import good_entries
from worker.tasks.datasets import validate_dataset


@pytest.fixture
def import_root(tmp_path: Path) -> Path:
    """The import root, with a dataset folder ``pets/`` and an archive ``archives/pets.zip``."""
    root = tmp_path / "shared"
    for name, data in good_entries(("cat", "dog"), 3).items():
        (root / "pets" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pets" / name).write_bytes(data)
    (root / "archives").mkdir()
    (root / "archives" / "pets.zip").write_bytes(good_zip())
    return root


@pytest.fixture
def importing(settings, import_root, make_client, make_user, bearer):
    """A client whose server imports from ``import_root``, the settings, and an admin's header."""
    enabled = settings.model_copy(update={"import_root": str(import_root)})
    client = make_client(enabled)
    return client, enabled, bearer(client, make_user(role=Role.ADMIN))


def do_import(client, headers, path: str, name: str = "imported", **extra):
    return client.post("/api/v1/datasets/import", json={"name": name, "path": path, **extra}, headers=headers)


def rows(settings) -> list[Dataset]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Dataset)))


def folders(settings) -> list[Path]:
    root = settings.data_dir / "datasets"
    return sorted(root.iterdir()) if root.exists() else []


def test_a_folder_import_is_hard_linked_and_validated(importing, import_root):
    client, settings, admin = importing
    response = do_import(client, admin, "pets")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating" and body["source"] == "import"
    assert body["original_filename"] == "pets"
    assert validate_dataset(settings, body["id"]) == "ready"
    ready = client.get(f"/api/v1/datasets/{body['id']}", headers=admin).json()
    assert ready["status"] == "ready" and ready["num_images"] == 6 and ready["num_classes"] == 2
    assert ready["summary"]["import"] == {
        "kind": "folder",
        "path": "pets",
        "method": "hard link",
        "linked": 6,
        "copied": 0,
        "bytes": sum(p.stat().st_size for p in (import_root / "pets").rglob("*") if p.is_file()),
    }
    stored = settings.data_dir / "datasets" / str(body["id"]) / "images" / "cat" / "0.png"
    source = import_root / "pets" / "cat" / "0.png"
    assert os.stat(stored).st_ino == os.stat(source).st_ino  # the same file: no copy

    # Deleting the dataset removes Tessera's links, never the source.
    before = {p: p.read_bytes() for p in (import_root / "pets").rglob("*") if p.is_file()}
    assert client.delete(f"/api/v1/datasets/{body['id']}", headers=admin).json()["status"] == "deleted"
    assert rows(settings) == [] and folders(settings) == []
    assert {p: p.read_bytes() for p in (import_root / "pets").rglob("*") if p.is_file()} == before
    assert os.stat(source).st_nlink == 1


def test_an_archive_import_links_the_file_as_the_upload(importing, import_root, make_user, bearer):
    client, settings, admin = importing
    owner = make_user("bob")
    response = do_import(client, admin, "archives/pets.zip", owner="bob")
    assert response.status_code == 201, response.text
    body = response.json()
    source = import_root / "archives" / "pets.zip"
    upload = settings.data_dir / "datasets" / str(body["id"]) / "upload"
    assert os.stat(upload).st_ino == os.stat(source).st_ino
    assert body["size_bytes"] == source.stat().st_size and body["summary"]["import"]["method"] == "hard link"
    assert validate_dataset(settings, body["id"]) == "ready"
    with session_scope(settings) as session:
        row = session.get(Dataset, body["id"])
        assert row.owner_id == owner.id and row.num_images == 6
        assert row.summary["import"] == {"kind": "file", "path": "archives/pets.zip", "method": "hard link"}
        # Imports are not counted against the owner's quota.
        assert storage_used(session, owner.id) == 0
    # The admin does not own it; the owner deletes it, and the source stays.
    assert client.get(f"/api/v1/datasets/{body['id']}", headers=admin).status_code == 404
    data = source.read_bytes()
    deleted = client.delete(f"/api/v1/datasets/{body['id']}", headers=bearer(client, owner))
    assert deleted.json()["status"] == "deleted"
    assert folders(settings) == [] and source.read_bytes() == data


@pytest.mark.parametrize(
    "path",
    ["../outside", "pets/../../outside", "/etc", "escape", "escape/x.png", "pets\x00", "missing", "fifo"],
)
def test_refused_paths_are_400_and_create_nothing(importing, import_root, tmp_path, path):
    client, settings, admin = importing
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    (import_root / "escape").symlink_to(outside)  # a link out of the root
    os.mkfifo(import_root / "fifo")
    response = do_import(client, admin, path)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]
    assert rows(settings) == [] and folders(settings) == []


def test_a_symlink_inside_an_imported_folder_is_reported_not_followed(importing, import_root, tmp_path):
    client, settings, admin = importing
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for tessera")
    (import_root / "pets" / "cat" / "link.png").symlink_to(secret)
    dataset_id = do_import(client, admin, "pets").json()["id"]
    assert validate_dataset(settings, dataset_id) == "invalid"
    body = client.get(f"/api/v1/datasets/{dataset_id}", headers=admin).json()
    assert [p["code"] for p in body["problems"]] == ["link_entry"]
    assert not (settings.data_dir / "datasets" / str(dataset_id) / "images").exists()
    assert secret.read_bytes() == b"not for tessera"


def test_only_admins_may_import_and_only_when_enabled(importing, settings, make_client, make_user, bearer):
    client, enabled, admin = importing
    member = bearer(client, make_user())
    assert do_import(client, member, "pets").status_code == 404
    disabled = make_client(settings)  # import_root empty by default
    response = do_import(disabled, bearer(disabled, make_user(role=Role.ADMIN)), "pets")
    assert response.status_code == 403 and "TESSERA_IMPORT_ROOT" in response.json()["detail"]
    assert rows(settings) == [] and folders(settings) == []


def test_a_bad_name_or_owner_is_400(importing, make_user):
    client, settings, admin = importing
    assert do_import(client, admin, "pets", name="bad\x01name").status_code == 400
    assert do_import(client, admin, "pets", owner="nobody").status_code == 400
    assert rows(settings) == [] and folders(settings) == []


def test_the_import_endpoint_is_in_the_openapi_schema(importing):
    client, _, _ = importing
    operation = client.get("/openapi.json").json()["paths"]["/api/v1/datasets/import"]["post"]
    assert "DatasetImport" in str(operation["requestBody"]) and "201" in operation["responses"]


SHM = Path("/dev/shm")


@pytest.mark.skipif(
    not SHM.is_dir() or not os.access(SHM, os.W_OK), reason="needs a second filesystem (/dev/shm)"
)
def test_across_filesystems_the_import_falls_back_to_a_copy(
    settings, make_client, make_user, bearer, tmp_path
):
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(dir=SHM, prefix="tessera-import-"))
    try:
        if os.stat(root).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the data folder's filesystem here")
        for name, data in good_entries(("cat", "dog"), 3).items():
            (root / "pets" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "pets" / name).write_bytes(data)
        (root / "pets.zip").write_bytes(good_zip())
        enabled = settings.model_copy(update={"import_root": str(root)})
        client = make_client(enabled)
        admin = bearer(client, make_user(role=Role.ADMIN))
        archive = do_import(client, admin, "pets.zip").json()
        assert archive["summary"]["import"]["method"] == "copy"
        folder = do_import(client, admin, "pets").json()
        for body in (archive, folder):
            assert validate_dataset(enabled, body["id"]) == "ready"
        summary = client.get(f"/api/v1/datasets/{folder['id']}", headers=admin).json()["summary"]
        assert summary["import"]["method"] == "copy" and summary["import"]["copied"] == 6
        stored = settings.data_dir / "datasets" / str(folder["id"]) / "images" / "cat" / "0.png"
        assert stored.read_bytes() == (root / "pets" / "cat" / "0.png").read_bytes()
        assert os.stat(stored).st_ino != os.stat(root / "pets" / "cat" / "0.png").st_ino
    finally:
        shutil.rmtree(root, ignore_errors=True)
