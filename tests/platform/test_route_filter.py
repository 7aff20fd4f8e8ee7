"""The path prefilter in front of the included routers (backend/route_filter.py) answers exactly
what the routers themselves answer, for every route, method and near-miss path; and requests
still reach their routes, 404s, 405s and trailing-slash redirects as before."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import iter_route_contexts
from starlette.routing import Match

from backend.config import Settings
from backend.main import create_app
from backend.route_filter import ORIGINAL_MATCHES

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_PARAM = re.compile(r"\{([^}]+)\}")
#: Values tried for a path parameter, the first its pattern accepts is used.
_SAMPLES = ("7", "a1b2", "some/deep/file.txt")


def _concrete_path(context) -> str:  # noqa: ANN001
    """A path ``context``'s route matches, made by filling its parameters with sample values."""
    template: str = context.path_format
    regex: re.Pattern[str] = context.path_regex
    names = _PARAM.findall(template)
    for values in ([s] * len(names) for s in _SAMPLES):
        path = template
        for name, value in zip(names, values, strict=True):
            path = path.replace("{" + name + "}", value, 1)
        if regex.match(path):
            return path
    raise AssertionError(f"no sample value fits {template}")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data"), secret_key="k"))


def test_every_included_router_is_prefiltered(app) -> None:  # noqa: ANN001
    grouped = [route for route in app.router.routes if not hasattr(route, "path_regex")]
    assert len(grouped) >= 10
    assert all(hasattr(route, ORIGINAL_MATCHES) for route in grouped)


def _probe_paths(app) -> list[str]:  # noqa: ANN001
    paths = {"/", "/nothing", "/api/v1/nothing/here", "/api/v1", "/api/v1/", "/static", "/tasks/x/y/z"}
    for context in iter_route_contexts(app.routes):
        path = _concrete_path(context)
        paths |= {path, path + "/", path.rstrip("/") or "/", path + "/extra", path[:-1] or "/"}
    return sorted(paths)


def test_the_prefilter_answers_what_each_router_answers(app) -> None:  # noqa: ANN001
    routes = [route for route in app.router.routes if hasattr(route, ORIGINAL_MATCHES)]
    paths = _probe_paths(app)
    assert len(paths) > 250
    outcomes = set()
    for path in paths:
        for method in METHODS:
            scope = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
            for route in routes:
                filtered = route.matches(dict(scope))
                unfiltered = getattr(route, ORIGINAL_MATCHES)(dict(scope))
                assert filtered == unfiltered, (path, method, route)
                outcomes.add(filtered[0])
    # The probes reach every kind of answer: the routers are really asked, not only refused.
    assert outcomes == {Match.NONE, Match.PARTIAL, Match.FULL}


def test_every_route_is_reached_by_its_own_paths(app) -> None:  # noqa: ANN001
    """The route the application selects for each route's path and method is that route (or an
    earlier one with the same path pattern that FastAPI has always preferred)."""
    for context in iter_route_contexts(app.routes):
        path = _concrete_path(context)
        for method in sorted(getattr(context, "methods", None) or {"GET"}):
            scope = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
            chosen = None
            for route in app.router.routes:
                match, _ = route.matches(dict(scope))
                if match == Match.FULL:
                    chosen = route
                    break
            assert chosen is not None, (method, path)
            owners = [r for r in app.router.routes if context.original_route in _originals(r)]
            assert chosen in owners or _same_pattern_earlier(app, chosen, context, scope), (method, path)


def _originals(route) -> list:  # noqa: ANN001
    return [c.original_route for c in iter_route_contexts([route])]


def _same_pattern_earlier(app, chosen, context, scope) -> bool:  # noqa: ANN001
    return any(
        c.path_regex.pattern == context.path_regex.pattern or c.path_regex.match(scope["path"])
        for c in iter_route_contexts([chosen])
    )


def test_requests_404_405_and_redirects_answer_as_before(client, make_user, bearer) -> None:  # noqa: ANN001
    headers = bearer(client, make_user())
    assert client.get("/api/v1/users/me", headers=headers).json()["username"]
    missing = client.get("/api/v1/nothing/here", headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "There is nothing at this address."}
    page = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert page.status_code == 404 and "Page not found" in page.text
    wrong = client.delete("/api/v1/users/me", headers=headers)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET"
    slash = client.get("/api/v1/users/me/", headers=headers)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/api/v1/users/me")
    assert client.get("/static/no-such-file.css").status_code == 404
