"""The dashboard (SPEC §12): a static page shipped in the wheel, served at `GET /ui` without
auth. It holds no data: the page fetches the router's read routes itself, with the key the
user gives it, so no data is reachable here without a key.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from kvctl.router.errors import error_response, shorten

_MEDIA_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Nothing but the router itself: no inline script, no other origin, not framed.
_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def routes() -> list[Route]:
    files = {name: resources.files(__name__).joinpath(name).read_bytes() for name in _MEDIA_TYPES}

    def serve(name: str) -> Response:
        return Response(files[name], media_type=_MEDIA_TYPES[name], headers=_HEADERS)

    async def page(request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            return error_response(404, f"No file '{shorten(name, 100)}' in the dashboard.", "not_found")
        return serve(name)

    async def root(request: Request) -> Response:
        return RedirectResponse("/ui")

    return [Route("/", root), Route("/ui", page), Route("/ui/{name}", asset)]
