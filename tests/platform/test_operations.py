"""Health check, metrics, error shapes and security headers."""

from __future__ import annotations

from backend.main import create_app
from tests.conftest import SyncClient


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
