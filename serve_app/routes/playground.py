"""The browser playground: GET / (the page) and GET /static/{name} (its assets).

The page is plain HTML/CSS/JS shipped in ``serve_app/static`` (no build step, nothing
fetched from elsewhere). Only the files present in that folder when the router is built
are served; any other name, including one that tries to leave the folder, is a 404.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

__all__ = ["STATIC_DIR", "build_playground_router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Explicit, so the answer does not depend on the host's mimetypes database.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# The assets change with the package version; make browsers revalidate instead of guessing.
_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _asset_index(static_dir: Path) -> dict[str, Path]:
    """Plain files directly in ``static_dir`` with a known type, by name."""
    if not static_dir.is_dir():
        return {}
    return {
        p.name: p
        for p in static_dir.iterdir()
        if p.is_file() and p.suffix in _CONTENT_TYPES and not p.name.startswith(".")
    }


def _not_found(name: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": "NOT_FOUND", "message": f"No playground asset named {name!r}. "
                   "Example: /static/app.js", "details": {}}},
        status_code=404,
    )


def build_playground_router(static_dir: Path | None = None) -> APIRouter:
    """A router serving the playground page at ``/`` and its assets at ``/static/{name}``."""
    assets = _asset_index(static_dir or STATIC_DIR)
    router = APIRouter()

    def _file(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            return _not_found(name)
        return FileResponse(path, media_type=_CONTENT_TYPES[path.suffix], headers=_CACHE)

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> Response:
        return _file("index.html")

    @router.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static_asset(name: str) -> Response:
        # A lookup in a fixed index: "..", "%2e%2e", slashes or absolute paths never match.
        return _file(name)

    return router
