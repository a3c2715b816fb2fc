"""A small synchronous client for the router's admin and introspection API (used by the CLI)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx

from kvctl.config import Config
from kvctl.errors import KvctlError


class RouterUnreachable(KvctlError):
    """The router did not answer (not running, or not yet listening)."""


class RouterRequestError(KvctlError):
    """The router answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def model_path(model: str) -> str:
    """A model name as one path segment (names may hold '/'; the router accepts %2F)."""
    return quote(model, safe="")


class RouterClient:
    """Talks to one router; the admin token comes from the config or $KVCTL_ADMIN_TOKEN."""

    def __init__(self, config: Config, *, url: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or config.router.url).rstrip("/")
        # Without an admin token, an api key still opens the read-only routes (stats, status).
        token = os.environ.get("KVCTL_ADMIN_TOKEN") or config.router.admin_token or next(iter(config.router.api_keys), None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params or None)

    def post(self, path: str, timeout: float | None = None) -> Any:
        return self._request("POST", path, timeout=timeout)

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RouterUnreachable(f"router at {self.url} is unreachable: {exc or type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 and not _is_action_result(body):
            raise RouterRequestError(response.status_code, f"router: {method} {path} -> {response.status_code}: {_error_message(body, response.text)}")
        return body


def _is_action_result(body: Any) -> bool:
    # Sleep/wake answer {"model_name", "success", "message", "state"} even on failure.
    return isinstance(body, dict) and "success" in body and "model_name" in body


def _error_message(body: Any, text: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", text))
    return text[:200]
