"""Memory plans in the new-task form and the API: both algorithms planned for the form's settings,
the plan in words, accepted with one click, kept by the task created from it.

The plan itself is made here by the job's own body (``make_plan``, the calibrated memory model on
this machine's CPU); a real light worker answering it while a training runs is in
tests/workers/test_serve_workers.py."""

from __future__ import annotations

import re
import shutil

import pytest

from backend.db import session_scope
from backend.models import Task
from backend.training import service
from backend.training.plans import accepted_values, plan_sentence
from tests.training.helpers import TINY_PATCHGD, builtin_backbone, ready_dataset
from worker.tasks.training import make_plan

GIB = 1 << 30


def _entry(algorithm: str, fits: bool, requested: dict, **chosen) -> dict:
    return {
        "algorithm": algorithm,
        "fits": fits,
        "requested": requested,
        "requested_bytes": 9 * GIB,
        "predicted_bytes": 3 * GIB,
        **chosen,
    }


def test_the_plan_in_words():
    shrunk = {
        "budget_gib": 4.0,
        "algorithms": {
            "patchgd": _entry(
                "patchgd",
                True,
                {"batch_size": 1, "image_size": 4096, "patches_per_step": 64},
                batch_size=1,
                patches_per_step=8,
                image_size=4096,
            ),
            "baseline": _entry(
                "baseline", True, {"batch_size": 1, "image_size": 4096}, batch_size=1, image_size=1536
            ),
        },
    }
    assert plan_sentence(shrunk) == (
        "The baseline must shrink 4096² to 1536² (batch 1) to fit 4 GiB; "
        "PatchGD fits 4 GiB at full resolution (4096²) with k=8 (not 64)."
    )
    as_set = {
        "budget_gib": 16,
        "algorithms": {
            "baseline": _entry(
                "baseline", True, {"batch_size": 2, "image_size": 512}, batch_size=2, image_size=512
            ),
            "patchgd": _entry(
                "patchgd",
                True,
                {"batch_size": 2, "image_size": 512, "patches_per_step": 8},
                batch_size=1,
                patches_per_step=8,
                image_size=512,
            ),
        },
    }
    assert plan_sentence(as_set) == (
        "The baseline fits 16 GiB at full resolution (512²) as set, with batch 2; "
        "PatchGD fits 16 GiB at full resolution (512²) with batch 1 (not 2)."
    )
    nothing = {
        "budget_gib": 0.25,
        "algorithms": {
            "patchgd": _entry("patchgd", False, {"batch_size": 1, "image_size": 8192, "patches_per_step": 4}),
            "baseline": _entry("baseline", False, {"batch_size": 1, "image_size": 8192}),
        },
    }
    assert plan_sentence(nothing) == (
        "The baseline does not fit 0.25 GiB even at 32² with batch 1; "
        "PatchGD does not fit 0.25 GiB at 8192² even with batch 1 and k=1 (that needs about 3.00 GiB)."
    )
    with pytest.raises(ValueError, match="does not fit the budget"):
        accepted_values(nothing, "baseline")
    assert accepted_values(shrunk, "baseline") == {
        "algorithm": "baseline",
        "batch_size": 1,
        "image_size": 1536,
        "memory_budget_gib": 4.0,
    }
    assert accepted_values(shrunk, "patchgd")["patches_per_step"] == 8


@pytest.fixture
def form(settings, client, make_user, login):
    user = make_user()
    csrf = login(client, user)
    headers = {"X-CSRF-Token": csrf}
    dataset_id = ready_dataset(settings, client, headers)
    backbone_id = builtin_backbone(settings)
    fields = {
        "csrf_token": csrf,
        "name": "planned",
        "dataset_id": str(dataset_id),
        "backbone_id": str(backbone_id),
        "algorithm": "patchgd",
        "image_size": "256",
        "patch_size": "64",
        "patches_per_step": "16",
        "batch_size": "4",
        "epochs": "1",
        "warmup_epochs": "0",
        "memory_budget_gib": "1.5",
    }
    return {"user": user, "fields": fields, "dataset_id": dataset_id, "backbone_id": backbone_id}


def _answer(settings, user, form_fields: dict, token: str) -> dict:
    """Make the plan the Plan button asked for (what the light worker's job does)."""
    from backend.models import User

    names = ("image_size", "patch_size", "patches_per_step", "batch_size", "epochs")
    hyperparameters = {k: int(form_fields[k]) for k in names}
    with session_scope(settings) as session:
        viewer = session.get(User, user.id)
        configs = service.plan_configs(
            session,
            settings,
            viewer,
            dataset_id=int(form_fields["dataset_id"]),
            backbone_id=int(form_fields["backbone_id"]),
            algorithm="patchgd",
            hyperparameters=hyperparameters,
            algorithms=["patchgd", "baseline"],
        )
    budget = float(form_fields["memory_budget_gib"])
    return make_plan(settings, token, configs, budget, verify=False, primary="patchgd")


@pytest.mark.slow
def test_plan_in_the_form_is_accepted_with_one_click_and_kept_by_the_task(settings, client, form):
    fields = form["fields"]
    page = client.get("/tasks/new").text
    assert 'id="task-form"' in page and 'hx-post="/tasks/new/plan"' in page and 'id="plan-empty"' in page
    refused = client.post("/tasks/new/plan", data={**fields, "memory_budget_gib": ""})
    assert refused.status_code == 422 and "Give a memory budget" in refused.text
    assert client.post("/tasks/new/plan", data={**fields, "csrf_token": ""}).status_code == 403

    asked = client.post("/tasks/new/plan", data=fields)
    assert asked.status_code == 200, asked.text
    token = re.search(r'hx-get="/tasks/new/plan/(u\d+-[0-9a-f]{32})"', asked.text).group(1)
    assert "planning both algorithms" in client.get(f"/tasks/new/plan/{token}").text

    report = _answer(settings, form["user"], fields, token)
    assert set(report["algorithms"]) == {"patchgd", "baseline"}
    for entry in report["algorithms"].values():
        assert entry["requested_bytes"] > 0 and entry["requested"]["image_size"] == 256
    panel = client.get(f"/tasks/new/plan/{token}")
    assert "hx-trigger" not in panel.text  # done: no more polling
    sentence = plan_sentence(report)
    assert sentence and sentence in panel.text
    # Each algorithm's predicted peak at the settings as given, and the planner's choice.
    for name in ("patchgd", "baseline"):
        gib = f"{report['algorithms'][name]['requested_bytes'] / GIB:.2f} GiB"
        assert re.search(rf'id="plan-{name}".*?{re.escape(gib)}', panel.text, re.S)

    fitting = [n for n in ("baseline", "patchgd") if report["algorithms"][n]["fits"]]
    assert fitting, report  # 1.5 GiB holds resnet18 at 256² with batch 1 on any CPU
    chosen = fitting[0]
    accepted = client.post(
        "/tasks/new/plan/accept", data={**fields, "plan_token": token, "plan_algorithm": chosen}
    )
    assert accepted.status_code == 200, accepted.text
    entry = report["algorithms"][chosen]
    html = accepted.text
    assert f'id="accepted-{chosen}"' in html and f'name="plan_token" id="plan_token" value="{token}"' in html
    assert re.search(rf'<option value="{chosen}"\s+selected', html)
    assert f'name="batch_size" value="{entry["batch_size"]}"' in html
    assert f'name="image_size" value="{entry["image_size"]}"' in html

    # The form as accepted creates the task, which keeps the plan.
    filled = dict(fields, algorithm=chosen, plan_token=token, batch_size=str(entry["batch_size"]))
    filled["image_size"] = str(entry["image_size"])
    if chosen == "patchgd":
        filled["patches_per_step"] = str(entry["patches_per_step"])
    created = client.post("/tasks/new", data=filled)
    assert created.status_code == 303, created.text
    with session_scope(settings) as session:
        task = session.get(Task, int(created.headers["location"].rsplit("/", 1)[1]))
        assert task.algorithm == chosen and task.memory_budget_gib == 1.5
        assert task.plan["token"] == token and task.plan["accepted"] == chosen
        assert task.plan["matches"] is True and task.plan["summary"] == sentence
        assert task.hyperparameters["batch_size"] == entry["batch_size"]


@pytest.mark.slow
def test_the_api_accepts_a_plan_by_its_token(settings, client, make_user, bearer, tiny_calibration):
    settings.ensure_data_dir()
    shutil.copy(tiny_calibration, settings.data_dir / tiny_calibration.name)  # read, not measured again
    user = make_user()
    auth = bearer(client, user)
    dataset_id = ready_dataset(settings, client, auth)
    backbone_id = builtin_backbone(settings)
    body = {
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": "patchgd",
        "algorithms": ["patchgd", "baseline"],
        "hyperparameters": dict(TINY_PATCHGD),
        "memory_budget_gib": 2,
    }
    token = client.post("/api/v1/tasks/plan", json=body, headers=auth).json()["token"]
    task_body = {
        "name": "planned",
        "dataset_id": dataset_id,
        "backbone_id": backbone_id,
        "algorithm": "baseline",
        "hyperparameters": {"image_size": 64, "batch_size": 4, "epochs": 1},
        "plan_token": token,
    }
    not_yet = client.post("/api/v1/tasks", json=task_body, headers=auth)
    assert not_yet.status_code == 409 and "still being made" in not_yet.text

    with session_scope(settings) as session:
        from backend.models import User

        configs = service.plan_configs(
            session,
            settings,
            session.get(User, user.id),
            dataset_id=dataset_id,
            backbone_id=backbone_id,
            algorithm="patchgd",
            hyperparameters=dict(TINY_PATCHGD),
            algorithms=["patchgd", "baseline"],
        )
    report = make_plan(settings, token, configs, 2.0, verify=False, primary="patchgd")
    done = client.get(f"/api/v1/tasks/plan/{token}", headers=auth).json()
    assert done["status"] == "done" and done["summary"] == plan_sentence(report)
    assert done["report"]["algorithms"]["baseline"]["requested"] == {"batch_size": 4, "image_size": 64}

    other = bearer(client, make_user())
    assert client.post("/api/v1/tasks", json=task_body, headers=other).status_code == 404
    created = client.post("/api/v1/tasks", json=task_body, headers=auth)
    assert created.status_code == 201, created.text
    plan = created.json()["plan"]
    baseline = report["algorithms"]["baseline"]
    assert plan["accepted"] == "baseline" and plan["token"] == token
    assert plan["matches"] is (baseline["batch_size"] == 4 and baseline["image_size"] == 64)
    assert created.json()["memory_budget_gib"] == 2.0  # the plan's budget


def test_a_plan_that_cannot_be_made_says_why_instead_of_planning_for_ever(
    settings, client, make_user, bearer
):
    user = make_user()
    auth = bearer(client, user)
    body = {
        "dataset_id": ready_dataset(settings, client, auth),
        "backbone_id": builtin_backbone(settings),
        "algorithm": "patchgd",
        "hyperparameters": dict(TINY_PATCHGD),
        "memory_budget_gib": 2,
    }
    token = client.post("/api/v1/tasks/plan", json=body, headers=auth).json()["token"]
    # What the worker is given when the settings cannot be planned: 64 px images, 48 px patches.
    broken = {"patchgd": dict(TINY_PATCHGD, patch_size=48, num_classes=2, backbone="resnet18")}
    with pytest.raises(Exception, match="48"):
        make_plan(settings, token, broken, 2.0, verify=False)
    failed = client.get(f"/api/v1/tasks/plan/{token}", headers=auth).json()
    assert failed["status"] == "failed" and "48" in failed["error"]
    panel = client.get(f"/tasks/new/plan/{token}", headers=auth)
    assert 'id="plan-errors"' in panel.text and "every 1s" not in panel.text


def test_baseline_calibration_points_keep_every_batchnorm_above_one_value():
    """A batch of 1 at 32 px leaves resnets a 1×1 map, which BatchNorm refuses in training; the
    smaller calibration point is at least 64 px even for small images."""
    from worker.patchgd.config import BaselineConfig
    from worker.patchgd.memory import step_calibration_points

    for size in (32, 64, 96, 128, 4096):
        low, high = step_calibration_points(BaselineConfig(image_size=size, num_classes=2))
        assert 64 <= low.image_size < high.image_size and low.batch_size == high.batch_size == 1
