"""Backbones through the API and the jobs: uploads that pass, uploads that are refused, who sees what."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend.config import Settings
from backend.db import session_scope
from backend.models import Backbone
from tests.backbones.conftest import write_code_pickle, write_torchscript
from tests.conftest import SyncClient, TestUser
from worker.patchgd.catalog import list_backbones
from worker.patchgd.models import build_backbone
from worker.tasks import backbones as jobs

API = "/api/v1/backbones"


def upload(
    client: SyncClient,
    headers: dict[str, str],
    path: Path,
    architecture: str = "resnet18",
    name: str = "mine",
) -> dict:
    """POST the file as the API expects it; returns the created backbone."""
    with path.open("rb") as handle:
        response = client.post(
            API,
            headers=headers,
            data={"name": name, "architecture": architecture},
            files={"file": (path.name, handle, "application/octet-stream")},
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating"
    return body


def validated(client: SyncClient, headers: dict[str, str], backbone_id: int) -> dict:
    """Run the validation job on the row (as a worker would) and read the backbone back."""
    jobs.validate(backbone_id)
    response = client.get(f"{API}/{backbone_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def member(
    make_user: Callable[..., TestUser], client: SyncClient, bearer: Callable[..., dict[str, str]]
) -> dict[str, str]:
    """A member's Authorization header."""
    return bearer(client, make_user("alice"))


def test_resnet18_state_dict_with_module_prefix_and_imagenet_head_is_ready(
    job_settings: Settings,
    client: SyncClient,
    member: dict[str, str],
    resnet18_state: dict[str, torch.Tensor],
    weights_dir: Path,
) -> None:
    path = weights_dir / "resnet18_dp.pt"
    torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, path)

    created = upload(client, member, path)
    body = validated(client, member, created["id"])

    assert body["status"] == "ready", body
    assert body["details"]["stripped_prefixes"] == ["module."]
    assert body["details"]["dropped_head"] == {"keys": ["fc.bias", "fc.weight"], "classes": 1000}
    assert body["param_count"] == sum(p.numel() for p in build_backbone("resnet18", 8).trunk.parameters())
    assert len(body["sha256"]) == 64 and body["size_bytes"] == path.stat().st_size
    with session_scope(job_settings) as session:
        row = session.get(Backbone, created["id"])
        assert row is not None
        stored = job_settings.data_dir / row.weights_path
    # The checked file is what training loads: a strict load, the same numbers as uploaded.
    assert stored.name == "weights.safetensors" and not (stored.parent / "upload.pt").exists()
    backbone = build_backbone("resnet18", 8, weights_path=stored)
    assert torch.equal(backbone.trunk.conv1.weight, resnet18_state["conv1.weight"])
    page = client.get(f"/backbones/{created['id']}", headers=member)
    assert page.status_code == 200
    assert "Stripped the key prefix" in page.text and "1000 classes" in page.text


def test_plain_safetensors_without_head_is_ready(
    job_settings: Settings,
    client: SyncClient,
    member: dict[str, str],
    resnet18_state: dict[str, torch.Tensor],
    weights_dir: Path,
) -> None:
    path = weights_dir / "trunk.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items() if not k.startswith("fc.")}, str(path))

    body = validated(client, member, upload(client, member, path)["id"])

    assert body["status"] == "ready", body
    assert body["details"]["format"] == "safetensors"
    assert "dropped_head" not in body["details"] and "stripped_prefixes" not in body["details"]


def test_pickle_that_would_create_a_file_is_refused_and_never_runs(
    job_settings: Settings, client: SyncClient, member: dict[str, str], weights_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "created-by-unpickling"
    path = write_code_pickle(weights_dir / "evil.pt", victim)

    body = validated(client, member, upload(client, member, path)["id"])

    assert body["status"] == "invalid"
    assert "run code" in body["error"] and "state_dict" in body["error"]
    assert not victim.exists()


def test_whole_pickled_module_is_refused_with_what_to_upload(
    job_settings: Settings, client: SyncClient, member: dict[str, str], weights_dir: Path
) -> None:
    path = weights_dir / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), path)

    body = validated(client, member, upload(client, member, path)["id"])

    assert body["status"] == "invalid"
    assert "whole pickled model" in body["error"]
    assert "torch.save(model.state_dict()" in body["error"]


def test_torchscript_archive_is_refused_with_the_message(
    job_settings: Settings, client: SyncClient, member: dict[str, str], weights_dir: Path
) -> None:
    path = write_torchscript(weights_dir / "scripted.pt")

    body = validated(client, member, upload(client, member, path)["id"])

    assert body["status"] == "invalid"
    assert "TorchScript" in body["error"] and "state_dict" in body["error"]


def test_mismatched_state_dict_is_invalid_with_the_first_mismatches(
    job_settings: Settings,
    client: SyncClient,
    member: dict[str, str],
    resnet18_state: dict[str, torch.Tensor],
    weights_dir: Path,
) -> None:
    state = dict(resnet18_state)
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)  # resnet18 has 64 stem filters
    del state["layer4.1.bn2.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = weights_dir / "wrong.pth"
    torch.save(state, path)

    created = upload(client, member, path)
    body = validated(client, member, created["id"])

    assert body["status"] == "invalid"
    assert "does not match resnet18" in body["error"]
    listed = {(p["kind"], p["key"]) for p in body["problems"]}
    assert listed == {
        ("shape", "conv1.weight"),
        ("missing", "layer4.1.bn2.bias"),
        ("unexpected", "extra.weight"),
    }
    page = client.get(f"/backbones/{created['id']}", headers=member)
    assert "conv1.weight: the file has shape (32, 3, 7, 7)" in page.text


def test_oversized_upload_is_413_and_leaves_no_temporary_file(
    settings: Settings,
    make_client: Callable[..., SyncClient],
    make_user: Callable[..., TestUser],
    bearer: Callable[..., dict[str, str]],
    weights_dir: Path,
) -> None:
    small = settings.model_copy(update={"max_weights_upload_bytes": 100_000})
    client = make_client(small)
    headers = bearer(client, make_user("bob"))
    path = weights_dir / "big.pt"
    path.write_bytes(b"\x80" + bytes(300_000))

    declared = client.post(
        API,
        headers=headers,
        data={"name": "big", "architecture": "resnet18"},
        files={"file": ("big.pt", path.read_bytes())},
    )

    async def chunks() -> AsyncIterator[
        bytes
    ]:  # no Content-Length: the limit is enforced while the body streams in
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="architecture"\r\n\r\nresnet18\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.pt"\r\n\r\n'
        )
        yield body
        for _ in range(30):
            yield bytes(10_000)
        yield b"\r\n--XyZ--\r\n"

    streamed = client.post(
        API, headers={**headers, "Content-Type": "multipart/form-data; boundary=XyZ"}, content=chunks()
    )

    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "too_large"
    incoming = settings.data_dir / "backbones" / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    with session_scope(settings) as session:
        assert session.query(Backbone).filter(Backbone.owner_id.is_not(None)).count() == 0


def test_another_users_backbone_is_not_found_everywhere(
    job_settings: Settings,
    make_client: Callable[..., SyncClient],
    make_user: Callable[..., TestUser],
    bearer: Callable[..., dict[str, str]],
    login: Callable[..., str],
    resnet18_state: dict[str, torch.Tensor],
    weights_dir: Path,
) -> None:
    owner_client, other_client = make_client(), make_client()
    owner = bearer(owner_client, make_user("owner"))
    path = weights_dir / "w.pt"
    torch.save(resnet18_state, path)
    backbone_id = upload(owner_client, owner, path)["id"]
    other = bearer(other_client, make_user("other"))

    assert other_client.get(f"{API}/{backbone_id}", headers=other).status_code == 404
    assert other_client.delete(f"{API}/{backbone_id}", headers=other).status_code == 404
    listed = other_client.get(API, headers=other).json()
    assert backbone_id not in {b["id"] for b in listed}
    browser = make_client()
    csrf = login(browser, make_user("browser"))
    assert browser.get(f"/backbones/{backbone_id}").status_code == 404
    assert browser.post(f"/backbones/{backbone_id}/delete", data={"csrf_token": csrf}).status_code == 404
    # The owner still has it, and can delete it (files go too).
    assert owner_client.delete(f"{API}/{backbone_id}", headers=owner).status_code == 204
    assert owner_client.get(f"{API}/{backbone_id}", headers=owner).status_code == 404
    assert not (job_settings.data_dir / "backbones" / str(backbone_id)).exists()


def test_builtins_are_listed_for_everyone_and_cannot_be_deleted(
    settings: Settings, client: SyncClient, member: dict[str, str]
) -> None:
    listed = client.get(API, headers=member).json()
    builtins = [b for b in listed if b["builtin"]]

    assert [b["architecture"] for b in builtins] == list_backbones()
    assert all(b["status"] == "ready" and b["source"] == "builtin" for b in builtins)
    for backbone in builtins[:2]:
        response = client.delete(f"{API}/{backbone['id']}", headers=member)
        assert response.status_code == 403
        assert "cannot be deleted" in response.json()["detail"]
    # Listing again creates nothing twice.
    assert len([b for b in client.get(API, headers=member).json() if b["builtin"]]) == len(list_backbones())
    page = client.get("/backbones", headers=member)
    assert page.status_code == 200


def test_upload_form_fields_are_checked(
    settings: Settings, client: SyncClient, member: dict[str, str], weights_dir: Path
) -> None:
    path = weights_dir / "w.pt"
    path.write_bytes(b"\x80\x02}q\x00.")
    for fields, filename, expected in (
        ({"name": "x", "architecture": "vgg16"}, "w.pt", "Unknown architecture"),
        ({"name": " ", "architecture": "resnet18"}, "w.pt", "name"),
        ({"name": "x", "architecture": "resnet18"}, "w.onnx", ".safetensors"),
    ):
        response = client.post(
            API, headers=member, data=fields, files={"file": (filename, path.read_bytes())}
        )
        assert response.status_code == 400, response.text
        assert expected in response.json()["detail"]
    incoming = settings.data_dir / "backbones" / "incoming"
    assert list(incoming.iterdir()) == []


def test_browser_upload_needs_the_csrf_header(
    settings: Settings,
    client: SyncClient,
    make_user: Callable[..., TestUser],
    login: Callable[..., str],
    weights_dir: Path,
) -> None:
    csrf = login(client, make_user("carol"))
    files = {"file": ("w.pt", b"\x80\x02}q\x00.")}
    fields = {"name": "x", "architecture": "resnet18"}

    refused = client.post(API, data={**fields, "csrf_token": csrf}, files=files)
    accepted = client.post(API, data=fields, files=files, headers={"X-CSRF-Token": csrf})

    assert refused.status_code == 403
    assert accepted.status_code == 201, accepted.text
    page = client.get("/backbones")
    assert "backbone-upload" in page.text and "validating" in page.text
