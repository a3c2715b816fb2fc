"""`kvctl bench`: an OpenAI-compatible load generator with TTFT / ITL / latency percentiles.

One event loop, one pooled keep-alive client (kvctl.http1.Client), request bodies built
before the run, SSE parsed by hand: the generator's own cost per request stays small
next to any engine's (figures in README, from benchmarks/bench_client_ceiling.py).

Closed loop (`concurrency`): that many workers each send a request as soon as their
last one finished. Open loop (`rate`): Poisson arrivals, seeded; `concurrency` then caps
the connections (requests beyond it wait for one, and that wait counts in their latency).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvctl.config import Config
from kvctl.errors import KvctlError, UsageError
from kvctl.http1 import Client, UpstreamError
from kvctl.percentile import percentile

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
PERCENTILES = (50, 90, 99)
_MAX_ERRORS_KEPT = 5
_BODIES_PER_MODEL = 32  # distinct prompts, cycled; enough to defeat a prefix cache
_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
]


@dataclass(frozen=True)
class BenchSpec:
    base_url: str  # without the /v1 suffix
    models: tuple[str, ...]
    endpoint: str = "chat"
    stream: bool = True
    concurrency: int = 8
    rate: float | None = None
    requests: int | None = None
    duration: float | None = None
    prompt_tokens: int = 128
    max_tokens: int = 64
    seed: int = 0
    api_key: str | None = None
    timeout: float = 600.0

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": self.requests,
            "duration": self.duration,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }


def base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all name the same endpoint."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def make_spec(
    config: Config | None,
    *,
    url: str | None,
    models: list[str],
    api_key: str | None,
    concurrency: int | None,
    rate: float | None,
    requests: int | None,
    duration: float | None,
    **options: Any,
) -> BenchSpec:
    """Resolve the CLI's choices: target, models, key, load shape. Raises UsageError."""
    if requests is not None and duration is not None:
        raise UsageError("give --requests or --duration, not both")
    if requests is None and duration is None:
        requests = 100
    for name, value in (("--concurrency", concurrency), ("--rate", rate), ("--requests", requests), ("--duration", duration)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive, got {value:g}")
    if options.get("endpoint") not in ENDPOINTS:
        raise UsageError(f"--endpoint must be one of: {', '.join(ENDPOINTS)}")
    if options.get("max_tokens", 1) < 1 or options.get("prompt_tokens", 1) < 1:
        raise UsageError("--max-tokens and --prompt-tokens must be at least 1")
    if url is None:
        if config is None:
            raise UsageError("no target: give --url or a config file")
        target = config.router.url
    else:
        target = base_url(url)
        if not target.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://, got {url!r}")
    if api_key is None and config is not None and config.router.api_keys:
        api_key = config.router.api_keys[0]
    if not models:
        models = list(config.models()) if config is not None and url is None else _served_models(target, api_key)
    return BenchSpec(
        base_url=target,
        models=tuple(dict.fromkeys(models)),
        api_key=api_key,
        # Closed loop by default; with --rate, --concurrency only caps the connections.
        concurrency=concurrency or (256 if rate is not None else 8),
        rate=rate,
        requests=requests,
        duration=duration,
        **options,
    )


def _served_models(target: str, api_key: str | None) -> list[str]:
    """GET /v1/models: what an endpoint serves, when --url is given without --model."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{target}/v1/models", headers=headers, timeout=10)
        response.raise_for_status()
        models = [m["id"] for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise KvctlError(f"cannot list the models of {target} (give --model): {exc}") from None
    if not models:
        raise KvctlError(f"{target}/v1/models lists no model; give --model")
    return models


# --------------------------------------------------------------------------- one request


class _Reader:
    """Consumes one response body (SSE or JSON) and times its tokens."""

    __slots__ = ("buf", "chunks", "done", "error", "first", "last", "stream", "usage_tokens")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.buf = b""
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if not self.stream:
            self.buf += data
            return
        now = time.perf_counter()
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip(), now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.error = f"unparseable SSE data: {payload[:100]!r}"
            return
        self._message(event)
        for choice in event.get("choices") or ():
            delta = choice.get("delta")
            if choice.get("text") or (delta and (delta.get("content") or delta.get("reasoning_content"))):
                if self.first is None:
                    self.first = now
                self.last = now
                self.chunks += 1

    def _message(self, message: Any) -> None:
        if not isinstance(message, dict):
            self.error = "response is not a JSON object"
            return
        if isinstance(message.get("error"), dict):
            self.error = str(message["error"].get("message", message["error"]))
        usage = message.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]

    def finish(self) -> None:
        if self.stream:
            if self.error is None and not self.done:
                self.error = "stream ended without [DONE]"
            return
        try:
            self._message(json.loads(self.buf))
        except ValueError:
            self.error = "response body is not JSON"

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


# --------------------------------------------------------------------------- results


@dataclass
class _Tally:
    """Everything measured for one model (or all of them)."""

    ok: int = 0
    failed: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # first distinct messages -> count

    def fail(self, message: str) -> None:
        self.failed += 1
        if message in self.errors or len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors[message] = self.errors.get(message, 0) + 1

    def merge(self, other: _Tally) -> None:
        self.ok += other.ok
        self.failed += other.failed
        self.tokens += other.tokens
        self.ttft += other.ttft
        self.itl += other.itl
        self.e2e += other.e2e
        for message, count in other.errors.items():
            if message in self.errors or len(self.errors) < _MAX_ERRORS_KEPT:
                self.errors[message] = self.errors.get(message, 0) + count

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "requests": self.ok + self.failed,
            "ok": self.ok,
            "failed": self.failed,
            "errors": [{"message": m, "count": c} for m, c in self.errors.items()],
            "request_rate": self.ok / seconds if seconds > 0 else 0.0,
            "output_tokens": self.tokens,
            "output_tokens_per_second": self.tokens / seconds if seconds > 0 else 0.0,
            "ttft_ms": _distribution(self.ttft),
            "itl_ms": _distribution(self.itl),
            "e2e_latency_ms": _distribution(self.e2e),
        }


def _distribution(seconds: list[float]) -> dict[str, float | None]:
    """Percentiles and mean, in milliseconds."""
    result: dict[str, float | None] = {f"p{q}": _in_ms(percentile(seconds, q)) for q in PERCENTILES}
    result["mean"] = statistics.fmean(seconds) * 1000 if seconds else None
    return result


def _in_ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        self.tallies = {model: _Tally() for model in spec.models}
        self.issued = 0
        self.done = 0
        self.failed = 0
        self.pool = Client(spec.base_url, spec.concurrency, spec.timeout)
        self.requests = self._build_requests()

    def _build_requests(self) -> dict[str, list[bytes]]:
        spec = self.spec
        rng = random.Random(spec.seed)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if spec.stream else "application/json"}
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        path = ENDPOINTS[spec.endpoint]
        built: dict[str, list[bytes]] = {}
        for model in spec.models:
            built[model] = []
            for _ in range(_BODIES_PER_MODEL):
                prompt = " ".join(rng.choice(_WORDS) for _ in range(max(1, spec.prompt_tokens)))
                body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": spec.stream}
                if spec.endpoint == "chat":
                    body["messages"] = [{"role": "user", "content": prompt}]
                else:
                    body["prompt"] = prompt
                if spec.stream:
                    body["stream_options"] = {"include_usage": True}
                built[model].append(self.pool.build(path, json.dumps(body).encode(), headers))
        return built

    async def one(self, index: int) -> None:
        models = self.spec.models
        model = models[index % len(models)]
        request = self.requests[model][(index // len(models)) % _BODIES_PER_MODEL]
        tally = self.tallies[model]
        reader = _Reader(self.spec.stream)
        start = time.perf_counter()
        try:
            status, error_body = await self.pool.send(request, reader.feed)
        except UpstreamError as exc:
            return self._failed(tally, str(exc))
        end = time.perf_counter()
        if not 200 <= status < 300:
            return self._failed(tally, _error_text(status, error_body))
        reader.finish()
        if reader.error is not None:
            return self._failed(tally, reader.error)
        tally.ok += 1
        self.done += 1
        tally.tokens += reader.tokens
        tally.e2e.append(end - start)
        if reader.first is not None:
            tally.ttft.append(reader.first - start)
            if reader.last is not None and reader.tokens > 1:
                tally.itl.append((reader.last - reader.first) / (reader.tokens - 1))

    def _failed(self, tally: _Tally, message: str) -> None:
        tally.fail(message)
        self.done += 1
        self.failed += 1

    def _more(self, deadline: float | None, loop: asyncio.AbstractEventLoop) -> bool:
        if self.spec.requests is not None and self.issued >= self.spec.requests:
            return False
        return deadline is None or loop.time() < deadline

    async def closed_loop(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            while self._more(deadline, loop):
                self.issued += 1
                await self.one(self.issued - 1)

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))

    async def open_loop(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.spec.seed)
        assert self.spec.rate is not None
        pending: set[asyncio.Task[None]] = set()
        arrival = loop.time()
        while self._more(deadline, loop):
            arrival += rng.expovariate(self.spec.rate)
            if deadline is not None and arrival >= deadline:
                break
            # Absolute arrival times: sleeping late does not shift later arrivals.
            await asyncio.sleep(max(0.0, arrival - loop.time()))
            task = asyncio.create_task(self.one(self.issued))
            self.issued += 1
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def run(self, on_tick: Callable[[_Run, float], None] | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.spec.duration if self.spec.duration is not None else None
        driver = self.open_loop(deadline) if self.spec.rate is not None else self.closed_loop(deadline)
        ticker = asyncio.create_task(self._tick(on_tick, start)) if on_tick else None
        interrupted = False
        try:
            await driver
        except asyncio.CancelledError:
            # Ctrl-C (asyncio.run cancels this task): report what finished instead of nothing.
            interrupted = True
        finally:
            if ticker:
                ticker.cancel()
            await self.pool.close()
        seconds = loop.time() - start
        overall = _Tally()
        for tally in self.tallies.values():
            overall.merge(tally)
        return {
            "spec": self.spec.describe(),
            "interrupted": interrupted,
            "duration_seconds": seconds,
            "overall": overall.summary(seconds),
            "models": {model: tally.summary(seconds) for model, tally in self.tallies.items()},
        }

    async def _tick(self, on_tick: Callable[[_Run, float], None], start: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            on_tick(self, loop.time() - start)
            await asyncio.sleep(0.1)  # a display refresh, not synchronisation


def run(spec: BenchSpec, on_tick: Callable[[Any, float], None] | None = None) -> dict[str, Any]:
    """Run the benchmark to completion; returns the JSON-able result (see README)."""
    return asyncio.run(_Run(spec).run(on_tick))
