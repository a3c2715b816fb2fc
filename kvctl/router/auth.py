"""Bearer credentials, read the same way by the data plane and the admin routes.

One rule: a request with more than one Authorization header is refused (400), whatever
the route: which one counts must never depend on who reads the headers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

DUPLICATE_CODE = "duplicate_authorization"
DUPLICATE_MESSAGE = "Send one Authorization header, not several."


class DuplicateAuthorization(Exception):
    """More than one Authorization header."""


def bearer(header: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), else None."""
    if header is None or header[:7].lower() != b"bearer ":
        return None
    return header[7:].strip()


def token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The bearer token of a request's (lower-cased) headers; DuplicateAuthorization if several."""
    values = [value for name, value in headers if name == b"authorization"]
    if len(values) > 1:
        raise DuplicateAuthorization
    return bearer(values[0]) if values else None


def matches(candidate: bytes | None, secrets: Sequence[bytes]) -> bool:
    """Constant time: every secret is compared, with no early exit."""
    if candidate is None:
        return False
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(candidate, secret)
    return ok
