"""Engine adapters: everything engine-specific lives here and nowhere else.

An adapter knows an engine's command line, its health path, how to put it to sleep,
wake it and ask whether it sleeps, and the names of its metrics; the registry at the end
names the engines a config may use. Adding an engine means adding an adapter and
registering it here (and, for the sim to imitate it, a dialect in kvctl/sim/).
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from kvctl.errors import EngineError, EngineTimeout
from kvctl.lazy import lazy_module
from kvctl.settings import quote
from kvctl.sim import settings as sim_settings
from kvctl.sim.dialects import DIALECTS

if TYPE_CHECKING:  # annotations only: config asks this module about engines
    import httpx

    from kvctl.config import Instance
else:  # imported at the first engine call: `kvctl status` and `config check` make none
    httpx = lazy_module("httpx")

PROBE_PROMPT = "kvctl verify probe: the capital of France is"
PROBE_TIMEOUT_SECONDS = 60.0


class EngineAdapter:
    """Base class; one instance per engine kind, stateless."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other names a config may give it
    module: ClassVar[str]  # run as PYTHON -m MODULE
    model_flag: ClassVar[str]
    health_path: ClassVar[str] = "/health"
    # Prometheus names of the engine's own gauges (running, waiting, KV cache usage).
    metric_running: ClassVar[str]
    metric_waiting: ClassVar[str]
    metric_kv_usage: ClassVar[str]

    def command(self, inst: Instance) -> list[str]:
        """The engine's argv, without any shell."""
        argv = [inst.python, "-m", self.module, self.model_flag, inst.model]
        if inst.add_host_flag:
            argv += ["--host", inst.host]
        if inst.add_port_flag:
            argv += ["--port", str(inst.port)]
        return argv + list(inst.args)

    def config_warnings(self, inst: Instance) -> list[str]:
        return []

    async def sleep(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        raise NotImplementedError

    async def wake(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        raise NotImplementedError

    async def is_sleeping(self, client: httpx.AsyncClient, inst: Instance) -> bool | None:
        """True/False when the engine can tell, None when it cannot."""
        return None

    async def waiting(self, client: httpx.AsyncClient, inst: Instance, timeout: float) -> int:
        """The engine's own count of requests waiting (its gauge `metric_waiting`, summed over
        labels); 0 when it cannot be read."""
        from prometheus_client.parser import text_string_to_metric_families  # the router's only

        try:
            response = await client.get(inst.url + "/metrics", timeout=timeout)
            samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
        except (httpx.HTTPError, ValueError):
            return 0
        return int(sum(s.value for s in samples if s.name == self.metric_waiting))

    async def reload_weights(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        """Read the weights from disk again (a verified wake's repair)."""
        raise EngineError(f"{inst.name}: the {self.name} engine cannot reload its weights")

    async def probe(self, client: httpx.AsyncClient, inst: Instance) -> str:
        """A fixed deterministic completion (temperature 0, 8 tokens): a verified wake
        compares it with the answer recorded when the engine was first ready. Every engine
        here speaks the OpenAI completions API, so this is not engine-specific."""
        body = {"model": inst.model, "prompt": PROBE_PROMPT, "max_tokens": 8, "temperature": 0}
        response = await self._post(client, inst, "/v1/completions", json=body, timeout=PROBE_TIMEOUT_SECONDS)
        try:
            return str(response.json()["choices"][0]["text"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineError(f"{inst.name}: the verify probe got no completion text") from None

    async def _post(self, client: httpx.AsyncClient, inst: Instance, path: str, *, timeout: float | None, **kwargs: object) -> httpx.Response:
        try:
            response = await client.post(inst.url + path, timeout=timeout, **kwargs)  # type: ignore[arg-type]
        except httpx.TimeoutException:
            raise EngineTimeout(f"{inst.name}: POST {path} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise EngineError(f"{inst.name}: POST {path} failed: {exc or type(exc).__name__}") from None
        if response.status_code >= 400:
            raise EngineError(f"{inst.name}: POST {path} answered {response.status_code}: {response.text[:200]}")
        return response


class VllmAdapter(EngineAdapter):
    name = "vllm"
    module = "vllm.entrypoints.openai.api_server"
    model_flag = "--model"
    metric_running = "vllm:num_requests_running"
    metric_waiting = "vllm:num_requests_waiting"
    metric_kv_usage = "vllm:kv_cache_usage_perc"

    def config_warnings(self, inst: Instance) -> list[str]:
        if not inst.sleep.enabled:
            return []
        missing = []
        if inst.env.get("VLLM_SERVER_DEV_MODE") != "1":
            missing.append("VLLM_SERVER_DEV_MODE=1 in engine_env")
        if "--enable-sleep-mode" not in inst.args:
            missing.append("--enable-sleep-mode in engine_args")
        if missing:
            return [f"sleep is enabled but {' and '.join(missing)} is missing: vLLM will refuse /sleep (set sleep.enabled: false to silence)"]
        return []

    async def sleep(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        # vLLM reads level and mode from the query string only; a JSON body is ignored.
        params: dict[str, str | int] = {"level": inst.sleep.level}
        if inst.sleep.mode:
            params["mode"] = inst.sleep.mode
        await self._post(client, inst, "/sleep", params=params, timeout=timeout)

    async def wake(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        if inst.sleep.level == 1:
            await self._post(client, inst, "/wake_up", timeout=timeout)
            return
        # Level 2 discarded the weights: wake them alone, reload them from disk, then the KV
        # cache (vLLM's documented order, so reloading never competes with the cache for memory).
        await self._post(client, inst, "/wake_up", params={"tags": "weights"}, timeout=timeout)
        await self.reload_weights(client, inst, timeout)
        await self._post(client, inst, "/wake_up", params={"tags": "kv_cache"}, timeout=timeout)

    async def reload_weights(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self._post(client, inst, "/collective_rpc", json={"method": "reload_weights"}, timeout=timeout)

    async def is_sleeping(self, client: httpx.AsyncClient, inst: Instance) -> bool | None:
        try:
            response = await client.get(inst.url + "/is_sleeping", timeout=10)
            if response.status_code == 200:
                return bool(response.json()["is_sleeping"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        return None


class SglangAdapter(EngineAdapter):
    name = "sglang"
    aliases = ("sgl",)
    module = "sglang.launch_server"
    model_flag = "--model-path"
    metric_running = "sglang:num_running_reqs"
    metric_waiting = "sglang:num_queue_reqs"
    metric_kv_usage = "sglang:token_usage"

    def config_warnings(self, inst: Instance) -> list[str]:
        if inst.sleep.enabled and "--enable-memory-saver" not in inst.args:
            return [
                "sleep is enabled but --enable-memory-saver is missing from engine_args: SGLang cannot release memory (set sleep.enabled: false to silence)"
            ]
        return []

    async def sleep(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self._post(client, inst, "/release_memory_occupation", json={"tags": []}, timeout=timeout)

    async def wake(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self._post(client, inst, "/resume_memory_occupation", json={"tags": []}, timeout=timeout)
        if "--enable-weights-cpu-backup" not in inst.args:
            # Released weights are gone unless backed up on the CPU: reload them.
            await self.reload_weights(client, inst, timeout)

    async def reload_weights(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self._post(client, inst, "/update_weights_from_disk", json={"model_path": inst.model}, timeout=timeout)


class SimAdapter(EngineAdapter):
    """kvctl's simulated engine; its HTTP API is that of the dialect it imitates."""

    name = "sim"
    module = "kvctl.sim"
    model_flag = "--model"

    def __init__(self, dialect: EngineAdapter) -> None:
        self.dialect = dialect
        self.metric_running = dialect.metric_running  # type: ignore[misc]
        self.metric_waiting = dialect.metric_waiting  # type: ignore[misc]
        self.metric_kv_usage = dialect.metric_kv_usage  # type: ignore[misc]

    def command(self, inst: Instance) -> list[str]:
        sim = inst.sim if inst.sim.memory_gb is not None else replace(inst.sim, memory_gb=inst.memory_gb)
        return super().command(replace(inst, args=(*sim_settings.argv(sim), *inst.args)))

    async def sleep(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self.dialect.sleep(client, inst, timeout)

    async def wake(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self.dialect.wake(client, inst, timeout)

    async def is_sleeping(self, client: httpx.AsyncClient, inst: Instance) -> bool | None:
        return await self.dialect.is_sleeping(client, inst)

    async def reload_weights(self, client: httpx.AsyncClient, inst: Instance, timeout: float | None = None) -> None:
        await self.dialect.reload_weights(client, inst, timeout)


# The registry: engine name -> adapter; the sim speaks the API of the engine its dialect names.
_ADAPTERS: dict[str, EngineAdapter] = {adapter.name: adapter for adapter in (VllmAdapter(), SglangAdapter())}
_SIMS = {dialect: SimAdapter(_ADAPTERS[dialect]) for dialect in DIALECTS}
_KINDS: tuple[type[EngineAdapter], ...] = (VllmAdapter, SglangAdapter, SimAdapter)
# The names a config may give (case-insensitive) -> the engine.
ENGINE_NAMES = {name: kind.name for kind in _KINDS for name in (kind.name, *kind.aliases)}
# docs/config.md's type of `engine:`
NAMES_DOC = ", ".join(f"`{kind.name}`" + "".join(f" (or `{alias}`)" for alias in kind.aliases) for kind in _KINDS)


def engine_name(text: object) -> str:
    """The engine a config's `engine:` value names; ValueError says why there is none."""
    if isinstance(text, str) and text.lower() in ENGINE_NAMES:
        return ENGINE_NAMES[text.lower()]
    hint = difflib.get_close_matches(text.lower(), list(ENGINE_NAMES), n=1) if isinstance(text, str) else []
    choices = ", ".join(sorted(set(ENGINE_NAMES.values())))
    raise ValueError(f"unknown engine {quote(text)}: use {choices}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def adapter_for(inst: Instance) -> EngineAdapter:
    return _SIMS[inst.sim.dialect] if inst.engine == "sim" else _ADAPTERS[inst.engine]
