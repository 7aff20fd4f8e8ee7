"""The pyramid level of a task: what a dataset offers, the API's checks, what a task and its clone
keep, and the form's level select. Datasets are uploaded and validated by the real job: pyramidal
TIFFs written by the engine's test helper (256²: levels 256², 128², 64² at 0.5, 1 and 2 µm/px)."""

from __future__ import annotations

import re

import pytest

from backend.db import session_scope
from backend.models import Dataset
from tests.training.helpers import TINY_BASELINE, TINY_PATCHGD, builtin_backbone, pyramid_zip, ready_dataset


@pytest.fixture
def setup(settings, client, make_user, bearer):
    user = make_user()
    auth = bearer(client, user)
    return {
        "auth": auth,
        "slides": ready_dataset(settings, client, auth, name="slides", archive=pyramid_zip()),
        "pets": ready_dataset(settings, client, auth, name="pets", size=32, per_class=3),
        "backbone_id": builtin_backbone(settings),
        "user": user,
    }


def create(client, setup, dataset: str = "slides", **overrides):  # noqa: ANN001, ANN201
    body = {
        "name": "run",
        "dataset_id": setup[dataset],
        "backbone_id": setup["backbone_id"],
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
        **overrides,
    }
    return client.post("/api/v1/tasks", json=body, headers=setup["auth"])


def field_error(response) -> tuple[str, str]:  # noqa: ANN001
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert len(detail) == 1, detail
    return detail[0]["field"], detail[0]["message"]


def test_validation_records_the_levels_every_image_has(client, setup):
    summary = client.get(f"/api/v1/datasets/{setup['slides']}", headers=setup["auth"]).json()["summary"]
    levels = summary["levels"]
    assert levels["count"] == 3 and levels["pyramidal"] and levels["mpp_known"] and not levels["differing"]
    assert [(e["level"], e["width"], e["mpp"]) for e in levels["levels"]] == [
        (0, [256, 256], [0.5, 0.5]),
        (1, [128, 128], [1.0, 1.0]),
        (2, [64, 64], [2.0, 2.0]),
    ]
    flat = client.get(f"/api/v1/datasets/{setup['pets']}", headers=setup["auth"]).json()["summary"]["levels"]
    assert flat["count"] == 1 and not flat["pyramidal"] and flat["levels"][0]["mpp"] is None


def test_a_level_every_image_has_is_kept_shown_and_cloned(client, setup):
    response = create(client, setup, pyramid_level=2)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["pyramid_level"] == 2 and task["hyperparameters"]["pyramid_level"] == 2
    read = client.get(f"/api/v1/tasks/{task['id']}", headers=setup["auth"]).json()
    assert read["pyramid_level"] == 2
    # Given among the hyperparameters instead: the same.
    inside = create(client, setup, hyperparameters={**TINY_PATCHGD, "pyramid_level": 1}).json()
    assert inside["pyramid_level"] == 1
    # A clone keeps it, as the same algorithm and as the other one.
    clone = client.post(f"/api/v1/tasks/{task['id']}/clone", headers=setup["auth"])
    assert clone.status_code == 201, clone.text
    assert clone.json()["pyramid_level"] == 2
    other = client.post(
        f"/api/v1/tasks/{task['id']}/clone", json={"algorithm": "baseline"}, headers=setup["auth"]
    )
    assert other.status_code == 201, other.text
    assert other.json()["algorithm"] == "baseline" and other.json()["pyramid_level"] == 2
    # Not given: level 0 (null), as before.
    assert create(client, setup).json()["pyramid_level"] is None


def test_a_level_out_of_range_is_refused_with_the_levels_there_are(client, setup):
    field, message = field_error(create(client, setup, pyramid_level=3))
    assert field == "pyramid_level"
    assert "level 3 does not exist in dataset 'slides': choose 0 to 2" in message
    field, message = field_error(create(client, setup, hyperparameters={**TINY_PATCHGD, "pyramid_level": 7}))
    assert field == "pyramid_level" and "choose 0 to 2" in message
    # The schema's own bounds.
    assert create(client, setup, pyramid_level=-1).status_code == 422
    # Twice, and not the same.
    field, message = field_error(
        create(client, setup, pyramid_level=1, hyperparameters={**TINY_PATCHGD, "pyramid_level": 2})
    )
    assert field == "pyramid_level" and "given twice" in message


def test_a_dataset_without_pyramids_has_level_zero_only(client, setup):
    field, message = field_error(create(client, setup, dataset="pets", pyramid_level=1))
    assert field == "pyramid_level"
    assert message == "dataset 'pets' has no pyramid: its images have one level, 0; level 1 does not exist"
    assert create(client, setup, dataset="pets", pyramid_level=0).status_code == 201


def test_slides_with_different_level_counts_offer_the_levels_all_have(settings, client, setup):
    # Class 0: 256² (3 levels); class 1: 128² (2 levels).
    mixed = ready_dataset(
        settings, client, setup["auth"], name="mixed", archive=pyramid_zip(sizes=(256, 128))
    )
    levels = client.get(f"/api/v1/datasets/{mixed}", headers=setup["auth"]).json()["summary"]["levels"]
    assert levels["count"] == 2 and levels["differing"] and levels["most"] == 3
    assert levels["levels"][1]["width"] == [64, 128] and levels["levels"][1]["mpp"] == [1.0, 1.0]
    setup = {**setup, "mixed": mixed}
    field, message = field_error(create(client, setup, dataset="mixed", pyramid_level=2))
    assert "choose 0 to 1 (some of its images have up to 3 levels" in message
    assert create(client, setup, dataset="mixed", pyramid_level=1).status_code == 201


def test_a_level_too_large_to_read_whole_is_refused(settings, client, setup):
    # The summary as validation would record 40,000² slides (level 1: 9,000², 81 MP, readable).
    with session_scope(settings) as session:
        row = session.get(Dataset, setup["slides"])
        summary = dict(row.summary)
        summary["levels"] = {
            **summary["levels"],
            "levels": [
                {**e, "width": [w, w], "height": [w, w], "max_pixels": w * w}
                for e, w in zip(summary["levels"]["levels"], (40_000, 9_000, 2_250), strict=True)
            ],
        }
        row.summary = summary
    field, message = field_error(create(client, setup, pyramid_level=0))
    assert field == "pyramid_level"
    assert "level 0 (40,000x40,000 px) has more than the 89,478,485 pixels" in message
    assert message.endswith("choose level 1 or higher")
    assert create(client, setup, pyramid_level=1).status_code == 201


def test_the_plan_checks_the_level_too(client, setup):
    body = {
        "dataset_id": setup["slides"],
        "backbone_id": setup["backbone_id"],
        "hyperparameters": dict(TINY_BASELINE),
        "algorithm": "baseline",
        "memory_budget_gib": 4,
    }
    refused = client.post("/api/v1/tasks/plan", json={**body, "pyramid_level": 5}, headers=setup["auth"])
    assert field_error(refused)[0] == "pyramid_level"
    accepted = client.post("/api/v1/tasks/plan", json={**body, "pyramid_level": 2}, headers=setup["auth"])
    assert accepted.status_code == 202, accepted.text


def test_the_form_lists_the_levels_with_their_size_and_mpp(client, login, setup):
    # The page session of the same user.
    token = login(client, setup["user"])
    fragment = client.get(f"/tasks/new/levels?dataset_id={setup['slides']}&image_size=64")
    assert fragment.status_code == 200, fragment.text
    html = fragment.text
    options = re.findall(r"<option value=\"(\d)\"[^>]*>([^<]+)</option>", html)
    assert [(v, " ".join(t.split())) for v, t in options] == [
        ("0", "Level 0 · 256×256 px · 0.50 µm/px"),
        ("1", "Level 1 · 128×128 px · 1.00 µm/px"),
        ("2", "Level 2 · 64×64 px · 2.00 µm/px"),
    ]
    chosen = client.get(f"/tasks/new/levels?dataset_id={setup['slides']}&image_size=64&pyramid_level=1").text
    effective = " ".join(re.search(r'id="level-effect"[^>]*>(.*?)</p>', chosen, re.S).group(1).split())
    # Level 1 (128² px at 1 µm/px) resized to 64²: each training pixel covers 2 µm.
    assert "128×128 px at 1.00 µm/px" in effective and "64×64 px" in effective and "2.00 µm/px" in effective
    flat = client.get(f"/tasks/new/levels?dataset_id={setup['pets']}").text
    assert "<select" not in flat and "one level" in flat and "µm/px unknown" in flat
    # The new-task page itself carries the select of its first dataset, and the form keeps a level.
    page = client.get("/tasks/new").text
    assert 'id="pyramid-level-field"' in page
    created = client.post(
        "/tasks/new",
        data={
            "csrf_token": token,
            "name": "from the form",
            "dataset_id": str(setup["slides"]),
            "backbone_id": str(setup["backbone_id"]),
            "algorithm": "baseline",
            "image_size": "64",
            "epochs": "1",
            "pyramid_level": "2",
        },
        follow_redirects=False,
    )
    assert created.status_code == 303, created.text
    task_page = client.get(created.headers["location"]).text
    assert re.search(r"pyramid level <strong>2</strong>", task_page), task_page[:3000]


def test_a_summary_without_levels_reads_them_from_the_report(settings, client, setup):
    # As an older summary: no "levels", and fewer pyramids listed than the dataset has.
    with session_scope(settings) as session:
        row = session.get(Dataset, setup["slides"])
        summary = {k: v for k, v in row.summary.items() if k != "levels"}
        assert summary["pyramid_count"] == 6
        row.summary = {**summary, "pyramids": summary["pyramids"][:1]}
    field, message = field_error(create(client, setup, pyramid_level=3))
    assert field == "pyramid_level" and "choose 0 to 2" in message
    assert create(client, setup, pyramid_level=2).status_code == 201
