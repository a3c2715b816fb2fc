"""A small synchronous client for the router's admin and introspection API (used by the CLI)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from kvctl.config import Config
from kvctl.errors import KvctlError
from kvctl.lazy import lazy_module

if TYPE_CHECKING:
    import httpx
else:
    httpx = lazy_module("httpx")  # ~40 ms of imports: paid by the commands that talk to the router

EVENTS_READ_TIMEOUT_SECONDS = 60.0


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

    def post(self, path: str, timeout: float | None = None, body: Any = None) -> Any:
        return self._request("POST", path, timeout=timeout, body=body)

    def events(self, *, follow: bool) -> Iterator[dict[str, Any]]:
        """The router's state changes from `GET /events` (SSE): its recent history, then, with
        `follow`, live ones until the router ends the stream."""
        # The router sends a keepalive every 15 s, so a silent minute means it is gone.
        timeout = httpx.Timeout(10.0, read=EVENTS_READ_TIMEOUT_SECONDS)
        try:
            with self._http.stream("GET", "/events", params={"follow": "true" if follow else "false"}, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise RouterRequestError(
                        response.status_code, f"router: GET /events -> {response.status_code}: {_error_message(_json(response), response.text)}"
                    )
                yield from _sse_data(response.iter_lines())
        except httpx.HTTPError as exc:
            raise RouterUnreachable(f"router at {self.url}: event stream failed: {exc or type(exc).__name__}") from None

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None, timeout: float | None = None, body: Any = None) -> Any:
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RouterUnreachable(f"router at {self.url} is unreachable: {exc or type(exc).__name__}") from None
        body = _json(response)
        if response.status_code >= 400 and not _is_action_result(body):
            raise RouterRequestError(response.status_code, f"router: {method} {path} -> {response.status_code}: {_error_message(body, response.text)}")
        return body


def json_object(value: Any) -> dict[str, Any]:
    """`value` when the router sent a JSON object there, else an empty one (tolerant reads)."""
    return value if isinstance(value, dict) else {}


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _sse_data(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a Server-Sent Events stream's `data:` fields (comments skipped)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            try:
                event = json.loads("\n".join(data))
            except ValueError:
                raise KvctlError(f"router sent an event that is not JSON: {data[0][:80]!r}") from None
            data = []
            if isinstance(event, dict):
                yield event


def _is_action_result(body: Any) -> bool:
    # Sleep/wake answer {"model_name", "success", "message", "state"} even on failure.
    return isinstance(body, dict) and "success" in body and "model_name" in body


def _error_message(body: Any, text: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", text))
    return text[:200]


# --------------------------------------------------------------------------- sleep, stop, wake

ACTION_STATES = {"sleep": "asleep", "stop": "stopped", "wake": "awake"}


@dataclass(frozen=True)
class ModelOutcome:
    """Where a model ended after `kvctl sleep/wake`: `ok` (in the state asked for), `failed`
    (with why), or `note`: another model that this command's wakes put to sleep."""

    mark: Literal["ok", "failed", "note"]
    model: str
    state: str
    reason: str = ""


def model_actions(client: RouterClient, action: str, models: list[str]) -> list[ModelOutcome]:
    """Ask the router to sleep, stop or wake each model, then report where each one ENDED: a
    later wake may have put an earlier model back to sleep to make room (memory budget)."""
    results: dict[str, dict[str, Any]] = {}  # canonical model name -> the router's answer
    evicted_for: dict[str, str] = {}  # instance name -> the model whose wake put it to sleep
    for name in models:
        result = client.post(f"/models/{model_path(name)}/{action}")
        results[str(result.get("model_name") or name)] = result
        evicted_for.update({str(inst): str(result.get("model_name") or name) for inst in result.get("evicted") or ()})
    final = json_object(client.get("/models").get("models"))
    outcomes = []
    for name, result in results.items():
        info = json_object(final.get(name))
        state = str(info.get("state", result.get("state")))
        if state == ACTION_STATES[action]:
            outcomes.append(ModelOutcome("ok", name, state))
            continue
        # The router's own words first when the action failed; else why the state changed.
        message = "" if result.get("success") else str(result.get("message", ""))
        reason = _evicted(info, evicted_for) or message or _cause(info) or "changed again after the router answered"
        outcomes.append(ModelOutcome("failed", name, state, reason))
    for name, info in final.items():
        reason = _evicted(json_object(info), evicted_for)
        if name not in results and reason:
            outcomes.append(ModelOutcome("note", name, str(json_object(info).get("state")), reason))
    return outcomes


def _instances(info: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in info.get("instances") or () if isinstance(i, dict)]


def _evicted(info: dict[str, Any], evicted_for: dict[str, str]) -> str:
    """'put to sleep to make room for M' when this command's wake of M slept the model."""
    if info.get("state") == "awake":
        return ""
    for inst in _instances(info):
        if inst.get("name") in evicted_for and inst.get("state") in ("asleep", "draining"):
            return f"put to sleep to make room for {evicted_for[inst['name']]}"
    return ""


def _cause(info: dict[str, Any]) -> str:
    """The router's reason for a model's state: why an instance failed, or its sleep cause."""
    instances = _instances(info)
    failures = [f"instance {i.get('name')} failed: {i['failure']}" for i in instances if i.get("failure")]
    causes = sorted({str(i["cause"]) for i in instances if i.get("cause") and i.get("state") == "asleep"})
    return "; ".join(failures) or (f"sleep cause: {', '.join(causes)}" if causes else "")
