"""Generated API tests: every operation of the live OpenAPI schema, anonymous, as a member and as an admin.

Schemathesis reads ``/openapi.json`` from the application itself, so every endpoint added later is
covered without touching this file. Each generated case is sent three times (no credentials, a
member's bearer token, an admin's bearer token) and each response must be no 5xx and conform to
the schema: documented status code, content type, body schema and headers, 405 with a correct
``Allow`` header for methods an operation does not support.

Generation is deterministic (fixed seed, derandomised, no example database), so a run is
reproducible and never flaky. Credentials are re-created before every case: a generated request
may legitimately destroy them (revoke the caller's token by id, deactivate or demote the member),
so each case starts from an active member and admin with fresh access tokens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from sqlalchemy import select

from backend.accounts import tokens
from backend.accounts import users as user_service
from backend.config import Settings
from backend.db import session_scope
from backend.main import create_app
from backend.models import Role, User
from tests.conftest import TEST_PASSWORD

MAX_EXAMPLES = 25
SEED = 20_260_601
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
    allow_header_conformance,
]
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",  # schema-valid and invalid inputs
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
    }
)
IDENTITIES = (None, Role.MEMBER, Role.ADMIN)
_USERNAMES = {Role.MEMBER: "generated-member", Role.ADMIN: "generated-admin"}


# tus upload chunks are raw bytes under their own media type: sent as the octet-stream they are.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


# The schema is read from the application when the module is collected (one test per operation);
# every test then points the same application at its test database.
APP = create_app(Settings(data_dir=Path(tempfile.gettempdir()) / "tessera-schema", secret_key="schema"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


@pytest.fixture(autouse=True)
def _app_on_the_test_database(settings: Settings) -> Iterator[None]:
    previous = APP.state.settings
    APP.state.settings = settings
    yield
    APP.state.settings = previous


def fresh_bearer(settings: Settings, role: Role) -> dict[str, str]:
    """An active account with ``role`` (restored if a previous case changed it) and a new access token."""
    with session_scope(settings) as session:
        user = session.scalar(select(User).where(User.username == _USERNAMES[role]))
        if user is None:
            user = user_service.create_user(session, settings, _USERNAMES[role], TEST_PASSWORD, role)
        user.role = role
        if not user.is_active:
            user_service.reactivate_user(session, user)
        issued = tokens.issue_access_token(session, settings, user)
        return {"Authorization": f"Bearer {issued.plaintext}"}


@schema.parametrize()
@hypothesis.settings(suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case, settings: Settings) -> None:
    for identity in IDENTITIES:
        headers = {} if identity is None else fresh_bearer(settings, identity)
        case.call_and_validate(headers=headers, checks=CHECKS)


def test_unsupported_methods_are_405_listing_every_method_of_the_path(client, make_user, bearer):
    auth = bearer(client, make_user("root", role=Role.ADMIN))
    me = client.patch("/api/v1/users/me", json={"role": "member"}, headers=auth)
    assert me.status_code == 405 and me.headers["Allow"] == "GET"
    assert me.json()["error"] == "method_not_allowed"
    collection = client.request("OPTIONS", "/api/v1/users", headers=auth)
    assert collection.status_code == 405 and collection.headers["Allow"] == "GET, POST"
    item = client.delete("/api/v1/users/1", headers=auth)
    assert item.status_code == 405 and item.headers["Allow"] == "GET, PATCH"


def test_malformed_bodies_are_a_documented_400(client, make_user, bearer):
    auth = bearer(client, make_user())
    response = client.post(
        "/api/v1/tokens", content=b"\xff\xfe{", headers={**auth, "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid"
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(operation["responses"]), f"{method} {path}"
