"""Bearer credentials, read the same way by the data plane and the admin routes.

One rule: a request with more than one Authorization header is refused (400), whatever
the route: which one counts must never depend on who reads the headers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvctl.config import RouterConfig

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


def admin_allowed(headers: Iterable[tuple[bytes, bytes]], router: RouterConfig, *, act: bool) -> bool:
    """Whether a request may use an admin route. Reading (introspection) takes any api key or
    the admin token, when keys are set; acting (sleep, wake, stop, kv_limit) takes the admin
    token when one is set, else as reading. DuplicateAuthorization if several headers."""
    credential = token(headers)  # first: several Authorization headers are refused even without keys
    admin = [router.admin_token.encode()] if router.admin_token is not None else []
    if act and admin:
        return matches(credential, admin)
    if not router.api_keys:
        return True
    return matches(credential, [key.encode() for key in router.api_keys] + admin)
