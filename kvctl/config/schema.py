"""The kvctl.yaml schema: one frozen dataclass per section.

Each key is declared once, as a field of the dataclass it fills (kvctl/settings.py's
`setting`: default, check, reference text); the tables the reader walks and docs/config.md's
tables (`reference_tables`) derive from those fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvctl import engines, kvcached
from kvctl.config import checks
from kvctl.settings import INVALID, Bool, Choice, Integer, Number, Setting, fields_of, reference_table, setting
from kvctl.sim import settings as sim_settings
from kvctl.sim.settings import SimSettings

_SECONDS_POSITIVE = Number(positive=True)


@dataclass(frozen=True)
class SleepSettings:
    """An instance's `sleep:` block: how it sleeps, and its own lifecycle policy (SPEC §15)."""

    enabled: bool = setting(True, Bool(), "`false` pins the instance awake (no sleep, by hand, idle or budget)")
    level: int = setting(
        1,
        Choice(1, 2),
        "vLLM sleep level: 1 keeps weights in CPU memory, 2 discards them (a wake reloads them)",
        default_text="`sleep_manager.vllm_sleep_level`",
    )
    mode: str | None = setting(
        None, Choice("abort", "wait", optional=True), "vLLM: abort running requests at sleep, or wait for them", default_text="`sleep_manager.vllm_sleep_mode`"
    )
    idle_seconds: float | None = setting(
        None,
        Number(positive=True, optional=True),
        "this instance's own idle threshold; set here, it applies even when `auto_sleep_enabled` is false",
        default_text="`sleep_manager.idle_threshold_seconds` (when `auto_sleep_enabled`)",
    )
    start: str = setting(
        "awake",
        Choice("awake", "asleep", "stopped"),
        "state after `up`: `asleep` = loaded, then put to sleep; `stopped` = not started until the first request",
    )
    start_explicit: bool = False  # `start:` written in the file (only then does it pin memory at `up`)
    stop_after_seconds: float | None = setting(
        None, Number(positive=True, optional=True), "asleep this long → the engine process is stopped (a request starts it again)"
    )
    priority: int = setting(0, Integer(-1000, 1000), "under the memory budget, lower priorities are put to sleep first")
    verify: bool = setting(
        False, Bool(), "after every wake, a fixed probe must answer as at first start, else the weights are reloaded (then the engine restarted)"
    )


_SLEEP_FIELDS = fields_of(SleepSettings)
_SIM_FIELDS = sim_settings.FIELDS


@dataclass(frozen=True)
class Instance:
    name: str = setting(
        dataclasses.MISSING,
        checks.nonempty_string,
        "process name: letters, digits, `_`, `.`, `-`, at most 64; unique; `router`, `supervisor`, `supervisord` are reserved",
        type_text="string",
        default_text="last part of `model`",
    )
    model: str = setting(
        dataclasses.MISSING,
        checks.nonempty_string,
        "the model name clients ask for (the routing key); several instances of one model are replicas",
        type_text="string",
    )
    engine: str = setting(dataclasses.MISSING, checks.engine_name, "the engine (case-insensitive)", type_text=engines.NAMES_DOC)
    host: str = setting(dataclasses.MISSING, checks.nonempty_string, "the engine's address", type_text="string", default_text="from `--host`, else `127.0.0.1`")
    port: int = setting(
        dataclasses.MISSING,
        checks.port,
        "the engine's port (one of the two is required; then kvctl adds `--port`)",
        type_text="port",
        default_text="from `--port` in `engine_args`",
    )
    # engine args as given (split), kvctl's own --host/--port not included
    args: tuple[str, ...] = setting(
        dataclasses.MISSING,
        checks.engine_args,
        "the engine's own arguments; each item split like shell words (never run by a shell)",
        key="engine_args",
        type_text="string or list of strings",
        default_text="`[]`",
    )
    python: str = setting(
        dataclasses.MISSING, checks.path, "the engine's interpreter when not using a venv", type_text="path", default_text="the interpreter kvctl runs on"
    )
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # kvcached block, kvcached_env, engine_env, KVCACHED_IPC_NAME
    aliases: tuple[str, ...] = setting(
        (),
        checks.list_of(checks.nonempty_string),
        "more model names; a request naming one is forwarded with `model` set to this instance's model",
        type_text="list of strings",
    )
    memory_gb: float | None = setting(
        None,
        checks.memory_gb,
        "GPU memory it holds awake, for `memory_budget_gb` (the sim reports it); with kvcached (`ENABLE_KVCACHED=true`) its weights and fixed "
        "buffers only, as its measured KV cache counts on top; `auto`: the engine processes' GPU memory measured through NVML "
        "(`pip install 'kvctl[gpu]'`; without a GPU and NVML, `auto` is an error)",
        type_text="number > 0, or `auto`",
    )
    memory_auto: bool = False  # `memory_gb: auto`: measured through NVML (kvctl/gpu.py)
    kv_limit_gb: float | None = setting(
        None,
        Number(positive=True, optional=True),
        "kvcached KV-cache limit written to the engine's segment whenever it becomes ready (start, restart, wake); needs `ENABLE_KVCACHED=true` in its environment",
    )
    sleep: SleepSettings = setting(
        SleepSettings(), checks.section("sleep", _SLEEP_FIELDS), "how this instance sleeps", type_text="mapping", default_text="see [sleep](#sleep)"
    )
    startup_timeout_seconds: float = setting(900.0, _SECONDS_POSITIVE, "how long a start may take until the health check passes")
    startretries: int = setting(
        3,
        Integer(0),
        "failed starts in a row (with back-off) before it stays stopped in state `failed`; `kvctl restart NAME` tries again",
    )
    sim: SimSettings = setting(
        SimSettings(), checks.section("sim", _SIM_FIELDS), "settings of `engine: sim`", type_text="mapping", default_text="see [sim](#sim)"
    )
    external: bool = setting(False, Bool(), "already running elsewhere: routed, not launched")
    add_host_flag: bool = False  # host/port came from kvctl keys, so kvctl passes the flags
    add_port_flag: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# Keys of an instance that feed other attributes (`env`, `python`) rather than one of their own.
_INSTANCE_INPUTS = {
    "engine_env": Setting(checks.environment, "environment of the engine", type_text="list of `KEY=VALUE` or mapping", default_text="`{}`"),
    "kvcached_env": Setting(
        checks.environment, "environment of the engine (kvcached's settings)", type_text="list of `KEY=VALUE` or mapping", default_text="`{}`"
    ),
    "using_venv": Setting(Bool(), "run the engine with `venv_path`'s `bin/python`", default=False),
    "venv_path": Setting(checks.path, "the engine's virtualenv", type_text="path", default=None),
}
INSTANCE_FIELDS = {**fields_of(Instance), **_INSTANCE_INPUTS}
INSTANCE_ATTRS = {spec.attr for spec in INSTANCE_FIELDS.values()}
INSTANCE_ALIASES = {"args": "engine_args"}


@dataclass(frozen=True)
class RouterConfig:
    enabled: bool = setting(True, Bool(), "run the router at all", key="enable_router")
    host: str = setting(
        "127.0.0.1",
        checks.nonempty_string,
        "address the router binds; a non-loopback address needs `api_keys` or `allow_unauthenticated: true`",
        key="router_host",
        type_text="string",
    )
    port: int = setting(8080, checks.port, "the router's port; no instance may use it", key="router_port", type_text="port")
    api_keys: tuple[str, ...] = setting(
        (),
        checks.list_of(checks.secret),
        "keys clients send as `Authorization: Bearer KEY`; each non-empty, without spaces",
        type_text="list of strings",
        default_text="`[]` (no auth)",
    )
    admin_token: str | None = setting(
        None,
        checks.optional_secret,
        "guards admin actions (sleep, wake, …), sent as `Authorization: Bearer TOKEN`; non-empty, without spaces",
        type_text="string",
    )
    allow_unauthenticated: bool = setting(False, Bool(), "allow a non-loopback `router_host` with no `api_keys` (then only a warning)")
    request_timeout_seconds: float = setting(600.0, _SECONDS_POSITIVE, "how long the router waits for an engine's first byte")
    stream_idle_timeout_seconds: float = setting(300.0, _SECONDS_POSITIVE, "longest pause between two chunks of an engine's answer")
    connect_timeout_seconds: float = setting(10.0, _SECONDS_POSITIVE, "to open a connection to an engine")
    max_body_bytes: int = setting(16 * 1024 * 1024, Integer(1), "largest request body accepted (413 beyond)", default_text="`16777216` (16 MiB)")
    max_queue_per_model: int = setting(1024, Integer(0), "requests that may wait for one model (e.g. during its wake); 429 `queue_full` beyond")
    health_check_interval_seconds: float = setting(2.0, _SECONDS_POSITIVE, "between health probes of each engine")
    health_failure_threshold: int = setting(3, Integer(1), "failed probes in a row before an instance is marked `down`")
    log_level: str = setting("info", Choice("debug", "info", "warning", "error"), "the router log's level")
    log_format: str = setting("text", Choice("text", "json"), "router log lines as text or as JSON objects")
    access_log: bool = setting(True, Bool(), "one log line per finished request")
    # Client-side limits (SPEC §16); none of them applies to the engine's side.
    # at least 1024: a request line and a few headers must fit
    max_header_bytes: int = setting(65536, Integer(1024), "client side: the request line and headers together (431 beyond)")
    header_timeout_seconds: float = setting(10.0, _SECONDS_POSITIVE, "client side: to send the request line and all headers")
    body_timeout_seconds: float = setting(30.0, _SECONDS_POSITIVE, "client side: longest wait between two reads of a request body")
    keepalive_timeout_seconds: float = setting(5.0, _SECONDS_POSITIVE, "client side: how long an idle keep-alive connection stays open")
    max_connections: int = setting(10000, Integer(1), "client side: open connections; beyond, 503 `router_overloaded` with Retry-After")

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


_ROUTER_FIELDS = fields_of(RouterConfig)


@dataclass(frozen=True)
class SleepManagerConfig:
    idle_threshold_seconds: float = setting(300.0, _SECONDS_POSITIVE, "an awake model without requests this long is idle")
    check_interval_seconds: float = setting(60.0, _SECONDS_POSITIVE, "how often auto-sleep looks for idle models")
    auto_sleep_enabled: bool = setting(False, Bool(), "put idle models to sleep")
    wakeup_on_request: bool = setting(True, Bool(), "a request for a sleeping model wakes it")
    min_sleep_duration: float = setting(0.0, Number(), "auto-sleep leaves an instance woken less than this long ago awake (never delays a request)")
    wake_timeout_seconds: float = setting(300.0, _SECONDS_POSITIVE, "how long a request may wait for a wake (503 `wake_timeout` beyond)")
    drain_timeout_seconds: float = setting(30.0, Number(), "how long a sleep waits for in-flight requests to finish")
    vllm_sleep_level: int = setting(1, Choice(1, 2), "default `sleep.level` of vLLM instances")
    vllm_sleep_mode: str | None = setting(
        None, Choice("abort", "wait", optional=True), "default `sleep.mode` of vLLM instances", default_text="none (vLLM's default)"
    )
    memory_budget_gb: float | None = setting(
        None,
        Number(positive=True, optional=True),
        "GPU memory the awake instances may hold together (their `memory_gb`); waking one beyond it first puts idle ones to sleep "
        "(lowest `priority`, then least recently used)",
        default_text="none (no budget)",
    )
    # a model woken for its queue is not slept for another sooner, while it has work
    min_awake_seconds: float = setting(5.0, Number(), "under the budget, a model woken for queued requests stays awake at least this long while it has work")
    # no waiting model starves longer, whatever the protection of others
    max_swap_wait_seconds: float = setting(60.0, _SECONDS_POSITIVE, "under the budget, no model with waiting requests waits longer than this for its turn")
    kv_rebalance: bool = setting(
        False,
        Bool(),
        "every `check_interval_seconds`, move kvcached KV-cache limit from idle awake instances to busy ones, within `kv_budget_gb` (needs it)",
    )
    kv_budget_gb: float | None = setting(
        None, Number(positive=True, optional=True), "the KV-cache limits of the awake kvcached instances together, for `kv_rebalance`"
    )
    kv_min_gb: float = setting(0.5, Number(), "`kv_rebalance` never moves an awake instance's KV limit below this (at most `kv_budget_gb`)")


_SLEEP_MANAGER_FIELDS = fields_of(SleepManagerConfig)


@dataclass(frozen=True)
class Config:
    path: Path
    # read separately (per item, with their own positions); the table's check is never called
    instances: tuple[Instance, ...] = setting(
        dataclasses.MISSING,
        lambda reader, value, pos: INVALID,
        "the engines to run or route to (at least one)",
        type_text="list of [instances](#instances)",
    )
    router: RouterConfig = setting(
        dataclasses.MISSING,
        checks.section("router", _ROUTER_FIELDS),
        "the OpenAI-compatible router in front of the engines",
        type_text="mapping",
        default_text="see [router](#router)",
    )
    sleep_manager: SleepManagerConfig = setting(
        dataclasses.MISSING,
        checks.section("sleep_manager", _SLEEP_MANAGER_FIELDS),
        "when and how models sleep and wake",
        type_text="mapping",
        default_text="see [sleep_manager](#sleep_manager)",
    )
    run_dir: Path = setting(
        dataclasses.MISSING,
        checks.nonempty_string,
        "rendered supervisord config, socket, pid, logs, router state; created mode 0700 (its socket path must stay under 100 characters)",
        type_text="path",
        default_text="`.kvctl` beside the file",
    )
    launch_delay_seconds: float = setting(0.0, Number(), "pause between engine starts")
    warnings: tuple[str, ...] = ()
    # Environment variables referenced as ${VAR} in router.api_keys / router.admin_token:
    # secrets of the router that engines must not inherit.
    secret_env: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def launched(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if not i.external)

    def models(self) -> dict[str, list[Instance]]:
        """Routing table: model name -> its instances (replicas), in config order."""
        table: dict[str, list[Instance]] = {}
        for inst in self.instances:
            table.setdefault(inst.model, []).append(inst)
        return table

    def aliases(self) -> dict[str, str]:
        """Alias -> the model it stands for."""
        return {alias: inst.model for inst in self.instances for alias in inst.aliases}

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)


TOP_FIELDS = {
    **fields_of(Config),
    "kvcached": Setting(
        checks.kvcached_block,
        "kvcached settings; each key is upper-cased into every engine's environment (`kvcached_gpu_utilization: 0.95` → `KVCACHED_GPU_UTILIZATION=0.95`)",
        type_text="mapping",
        default_text="`{}`",
    ),
}
# docs/config.md's headings -> the key table under each
REFERENCE = {
    "## Top level": TOP_FIELDS,
    "## router": _ROUTER_FIELDS,
    "## sleep_manager": _SLEEP_MANAGER_FIELDS,
    "## instances": INSTANCE_FIELDS,
    "### sleep": _SLEEP_FIELDS,
    "### sim": _SIM_FIELDS,
}


def reference_tables() -> dict[str, str]:
    """docs/config.md's heading -> the Markdown table of every key in that section."""
    return {heading: reference_table(table, INSTANCE_ALIASES if table is INSTANCE_FIELDS else None) for heading, table in REFERENCE.items()}


def kvcached_ipc_name(name: str) -> str:
    """`kvctl_` + the instance name, sanitised as kvcached would, so kvcached uses it unchanged."""
    return kvcached.sanitize(kvcached.OWNED_PREFIX + name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_digest(env: Mapping[str, str]) -> str:
    """A short digest of an environment, so a changed value changes the rendered config."""
    text = "\0".join(f"{k}={v}" for k, v in sorted(env.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
