"""The router's ASGI app: data-plane routes, admin and introspection endpoints, auth."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvctl.config import Config


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(config: Config) -> Starlette:
    return Starlette(routes=[Route("/health", _health)])
