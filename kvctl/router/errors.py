"""OpenAI-shaped error bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# Why the lifecycle could not give a request an instance (`Unavailable.code`) -> its HTTP
# status; every other reason (a wake, start or model that failed, timed out or is down) is 503.
_UNAVAILABLE_STATUS = {"model_not_found": 404, "queue_full": 429}


def unavailable_status(code: str) -> int:
    return _UNAVAILABLE_STATUS.get(code, 503)


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_object(status: int, message: str, code: str, param: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """For the admin routes (Starlette)."""
    return JSONResponse(error_object(status, message, code, param), status_code=status, headers=headers)


def error_bytes(status: int, message: str, code: str, param: str | None = None, headers: Iterable[tuple[bytes, bytes]] = (), close: bool = False) -> bytes:
    """A complete JSON error answer as HTTP/1.1 bytes, for what writes to a transport itself."""
    body = json.dumps(error_object(status, message, code, param)).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)]
    head += [b"%s: %s\r\n" % header for header in headers]
    if close:
        head.append(b"connection: close\r\n")
    return b"".join((*head, b"\r\n", body))


def sse_error_event(message: str, code: str) -> bytes:
    """The one `data:` line that ends a stream the engine broke (no [DONE] follows)."""
    payload = {"error": {"message": message, "type": "server_error", "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def shorten(text: str, limit: int = 200) -> str:
    """Client-supplied text echoed in an error, cut so a huge name cannot bloat the answer."""
    return text if len(text) <= limit else text[:limit] + "…"
