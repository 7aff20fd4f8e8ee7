"""Health check, metrics, error shapes and security headers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.db import session_scope, upgrade_database
from backend.main import create_app
from tests.conftest import SyncClient, new_database_url


def test_healthz_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_503_when_broker_unreachable(settings, make_client):
    client = make_client(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "ok", "broker": "unreachable"}


def test_metrics_count_requests_by_route_template(client, make_user, bearer):
    auth = bearer(client, make_user())
    client.delete("/api/v1/tokens/12345", headers=auth)
    client.get("/no/such/page")
    text = client.get("/metrics").text
    assert (
        'tessera_http_requests_total{method="DELETE",route="/api/v1/tokens/{token_id}",status="404"} 1.0'
        in text
    )
    assert 'tessera_http_requests_total{method="POST",route="/api/v1/auth/token",status="200"} 1.0' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "tessera_http_request_duration_seconds_bucket" in text
    assert "/12345" not in text  # raw paths never become labels


def test_404_is_json_for_the_api_and_a_page_for_browsers(client):
    api = client.get("/api/v1/does-not-exist")
    assert api.status_code == 404
    assert api.headers["content-type"].startswith("application/json")
    assert api.json() == {"error": "not_found", "detail": "There is nothing at this address."}

    page = client.get("/does-not-exist", headers={"Accept": "text/html"})
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "Page not found" in page.text
    assert '<link rel="stylesheet" href="/static/css/app.css">' in page.text  # extends the base layout


def test_htmx_errors_come_back_as_a_toast(client):
    response = client.get("/does-not-exist", headers={"HX-Request": "true"})
    assert response.status_code == 404
    assert response.headers["HX-Retarget"] == "#toasts"
    assert 'class="toast toast-error"' in response.text
    assert "<html" not in response.text


def test_security_headers_and_request_id(client):
    response = client.get("/login", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert response.headers["X-Request-ID"] == "abc-123"
    forged = client.get("/login", headers={"X-Request-ID": "bad id\nwith newline"})
    assert forged.headers["X-Request-ID"] != "bad id\nwith newline"


def test_openapi_and_docs_are_served_locally(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/auth/token", "/api/v1/users/me", "/api/v1/tokens"} <= set(spec["paths"])
    assert {tag["name"] for tag in spec["tags"]} >= {"auth", "users", "tokens"}
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "http" not in docs.text.split("<body>")[0].replace("http-equiv", "")
    assert client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200


def test_unexpected_errors_are_a_500_page_or_json_without_internals(settings, portal):
    app = create_app(settings)

    def explode() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/api/v1/explode", explode)
    app.add_api_route("/explode", explode)
    client = SyncClient(app, portal, raise_app_exceptions=False)
    try:
        api = client.get("/api/v1/explode")
        assert api.status_code == 500
        assert api.json()["error"] == "internal_error"
        page = client.get("/explode")
        assert page.status_code == 500 and "Something went wrong" in page.text
        assert "secret internals" not in api.text + page.text
    finally:
        client.close()


@pytest.fixture
def read_only_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The test settings on a migrated database that refuses writes, even to root.

    SQLite: the same file opened with ``mode=ro`` (file permissions do not stop root). Postgres: a
    fresh migrated database with ``default_transaction_read_only`` switched on.
    """
    if settings.is_sqlite:
        path = make_url(settings.database_url).database
        yield settings.model_copy(update={"database_url": f"sqlite:///file:{path}?mode=ro&uri=true"})
        return
    url, remove = new_database_url("postgres", tmp_path)
    upgrade_database(settings.model_copy(update={"database_url": url}))
    name = make_url(url).database
    with create_engine(url, isolation_level="AUTOCOMMIT").connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    try:
        yield settings.model_copy(update={"database_url": url})
    finally:
        remove()


def test_healthz_is_degraded_when_the_database_refuses_writes(read_only_settings, make_client, make_user):
    user = make_user("alice")  # written before the database turns read-only (SQLite: the same file)
    client = make_client(read_only_settings)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "database": "not_writable", "broker": "ok"}
    if read_only_settings.is_sqlite:  # what the health check predicts: signing in needs a write
        login = client.post("/api/v1/auth/token", data={"username": user.username, "password": user.password})
        assert login.status_code == 500


def test_healthz_check_leaves_the_database_unchanged(client, settings):
    with session_scope(settings) as session:
        before = session.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert client.get("/healthz").status_code == 200
    with session_scope(settings) as session:
        assert session.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == before


def test_metrics_need_the_token_when_one_is_configured(settings, make_client):
    client = make_client(settings.model_copy(update={"metrics_token": "scrape-secret"}))
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "unauthorized"
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic scrape-secret"}).status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "tessera_http_requests_total" in scraped.text


def test_metrics_are_open_without_a_token_and_documented_as_text(client):
    assert client.get("/metrics").status_code == 200
    responses = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert set(responses["200"]["content"]) == {"text/plain"}
    assert "401" in responses
