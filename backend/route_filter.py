"""A path prefilter in front of each included router, so a request is not matched against every route.

FastAPI (0.165) keeps each ``include_router`` as one entry of the application's route list, and
finding a request's route asks every entry in turn, each of which tries all of its routes one by
one (and the entry that matches does it again to handle the request; a 404 scans everything
twice more for the trailing-slash redirect). With about 180 routes in a dozen routers, that
matching cost more CPU than the rest of a typical request (docs/benchmarks.md, section 5).

:func:`install_route_prefilter` gives every included router one compiled regular expression, the
union of the full-path patterns of its routes: a request whose path matches none of them is
answered "no match" at once, which is exactly what the router would have answered after trying
each route (a route that does not match a path never matches it partially either, whatever the
method). Paths that do match go through FastAPI's own matching unchanged, so which route
handles a request, its path parameters, 405s and redirects are all as before.

The routes must be complete when it is installed (``create_app`` does it last): a route added to
an included router afterwards would not be in its pattern. Routes added to the application
itself (``app.add_api_route``) are not behind a prefilter and are unaffected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

try:  # FastAPI >= 0.165: included routers are kept as route groups
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI copies included routes into the app: nothing to prefilter
    iter_route_contexts = None  # type: ignore[assignment]

_NAMED_GROUP = re.compile(r"\(\?P<[^>]+>")
#: The attribute a prefiltered route keeps its original ``matches`` under (read by the tests).
ORIGINAL_MATCHES = "_tessera_unfiltered_matches"


def _full_path_patterns(route: BaseRoute) -> list[str] | None:
    """The path patterns of every route under ``route`` (full paths, prefixes included), or None
    when one of them is not matched by its path pattern alone (then ``route`` is left as it is)."""
    if iter_route_contexts is None:
        return None
    patterns: list[str] = []
    for context in iter_route_contexts([route]):
        original = context.original_route
        regex = getattr(context, "path_regex", None)
        if not isinstance(original, Route | Mount) or not isinstance(regex, re.Pattern):
            return None
        patterns.append(regex.pattern)
    return patterns


def _union(patterns: list[str]) -> re.Pattern[str]:
    """One pattern matching what any of ``patterns`` (each anchored ``^...$``) matches."""
    bodies = []
    for pattern in patterns:
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise ValueError(f"unexpected route pattern {pattern!r}")
        # Group names repeat across routes; only whether the path matches is needed here.
        bodies.append(_NAMED_GROUP.sub("(?:", pattern[1:-1]))
    return re.compile("^(?:" + "|".join(bodies) + ")$")


def _prefiltered(
    matches: Callable[[Scope], tuple[Match, Scope]], union: re.Pattern[str]
) -> Callable[[Scope], tuple[Match, Scope]]:
    def prefiltered_matches(scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and union.match(get_route_path(scope)) is None:
            return Match.NONE, {}
        return matches(scope)

    return prefiltered_matches


def install_route_prefilter(app: FastAPI) -> int:
    """Put a path prefilter in front of every included router of ``app``; returns how many."""
    installed = 0
    for route in app.router.routes:
        if isinstance(route, Route | Mount) or hasattr(route, ORIGINAL_MATCHES):
            continue  # a single route already matches with one pattern
        patterns = _full_path_patterns(route)
        if not patterns:
            continue
        original: Any = route.matches
        setattr(route, ORIGINAL_MATCHES, original)
        route.matches = _prefiltered(original, _union(patterns))  # type: ignore[method-assign]
        installed += 1
    return installed
