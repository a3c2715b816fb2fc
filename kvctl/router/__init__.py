"""The router: one OpenAI-compatible endpoint in front of every configured engine.

`create_app(config)` builds the ASGI app; `serve(config)` runs it under uvicorn in the
foreground on router.host:router.port (what `kvctl router` and supervisord run).
"""

from __future__ import annotations

from kvctl.router.app import create_app
from kvctl.router.server import serve

__all__ = ["create_app", "serve"]
