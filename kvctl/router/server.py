"""Running the router app under uvicorn."""

from __future__ import annotations

import uvicorn

from kvctl.config import Config
from kvctl.errors import UsageError


def serve(config: Config) -> None:
    """Run the router in the foreground until SIGINT/SIGTERM."""
    router = config.router
    if not router.is_loopback and not router.api_keys and not router.allow_unauthenticated:
        raise UsageError(
            f"refusing to serve on non-loopback host {router.host!r} without router.api_keys "
            "(set api_keys, or allow_unauthenticated: true to accept this explicitly)"
        )
    from kvctl.router.app import create_app

    uvicorn.run(
        create_app(config),
        host=router.host,
        port=router.port,
        http="httptools",
        loop="asyncio",
        log_level="warning",
        access_log=False,
    )
