"""The dataset pages: list with status badges, the upload page, a dataset's page (class chart,
sizes, split, thumbnails; problems; live status), and deletion from the page."""

from __future__ import annotations

import re

from tests.datasets.helpers import bad_zip, good_zip
from worker.tasks.datasets import validate_dataset


def upload(client, token: str, data: bytes, name: str) -> int:
    response = client.post(
        "/api/v1/datasets",
        data={"name": name},
        files={"file": (f"{name}.zip", data, "application/zip")},
        headers={"X-CSRF-Token": token},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_pages_show_status_results_and_problems(client, make_user, login, settings):
    token = login(client, make_user())
    assert "No datasets yet" in client.get("/datasets").text
    upload_page = client.get("/datasets/new")
    assert upload_page.status_code == 200 and 'id="upload-form"' in upload_page.text
    assert f'data-csrf="{token}"' in upload_page.text

    good = upload(client, token, good_zip(), "pets")
    bad = upload(client, token, bad_zip(), "broken")
    listing = client.get("/datasets").text
    assert listing.count('data-status="validating"') == 2

    # While validating, the status panel polls itself; the page shows the live panel.
    polling = client.get(f"/datasets/{good}/status")
    assert 'hx-get="/datasets/' in polling.text and "HX-Refresh" not in polling.headers
    assert 'id="dataset-status"' in client.get(f"/datasets/{good}").text

    validate_dataset(settings, good)
    validate_dataset(settings, bad)
    done = client.get(f"/datasets/{good}/status", headers={"HX-Request": "true"})
    assert done.headers.get("HX-Refresh") == "true" and "hx-get" not in done.text

    page = client.get(f"/datasets/{good}").text
    bars = re.findall(r'<rect [^>]*data-class="(\w+)" data-count="(\d+)"', page)
    assert bars == [("cat", "3"), ("dog", "3")]
    assert page.count('src="/api/v1/datasets/') >= 4  # thumbnails, per class
    assert 'id="sizes"' in page and 'id="split"' in page
    assert 'data-status="ready"' in client.get("/datasets").text

    invalid = client.get(f"/datasets/{bad}").text
    assert 'id="problems"' in invalid and "too_few_classes" in invalid and "class_chart" not in invalid


def test_delete_from_the_page_needs_the_csrf_token(client, make_user, login, settings):
    token = login(client, make_user())
    dataset_id = upload(client, token, good_zip(), "pets")
    validate_dataset(settings, dataset_id)
    assert client.post(f"/datasets/{dataset_id}/delete", data={}).status_code == 403
    assert client.get(f"/datasets/{dataset_id}").status_code == 200
    response = client.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": token})
    assert response.status_code == 303 and response.headers["location"] == "/datasets"
    assert client.get(f"/datasets/{dataset_id}").status_code == 404
    assert not (settings.data_dir / "datasets" / str(dataset_id)).exists()
