"""Interactive API documentation served from vendored Swagger UI (no CDN)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backend.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def api_docs(request: Request) -> Response:
    """Swagger UI for ``/openapi.json``."""
    return render(request, "pages/docs.html", {"openapi_url": request.app.openapi_url})
