"""The kvctl.yaml schema: loading, defaults, kvcached compatibility and validation.

Each key is declared once, as a field of the dataclass it fills (kvctl/settings.py's
`setting`: default, check, reference text); the tables the reader walks and docs/config.md's
tables (`reference_tables`) derive from those fields.

Every problem is reported as ``FILE:LINE:COL: message``; loading collects all of them
before raising one :class:`ConfigError`, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning
from ruamel.yaml.events import MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, SequenceNode

from kvctl import engines, kvcached
from kvctl.errors import ConfigError
from kvctl.settings import INVALID, Bool, Choice, Convert, Integer, Number, Pos, Setting, clip, describe, fields_of, quote, reference_table, setting
from kvctl.sim import settings as sim_settings
from kvctl.sim.settings import SimSettings

DEFAULT_PATH = "kvctl.yaml"
# Loader limits (docs/config.md): a real kvctl.yaml is a few KiB, a few levels deep.
MAX_FILE_BYTES = 1024 * 1024
MAX_LINE_CHARS = 16 * 1024
MAX_DEPTH = 32
MAX_VALUES = 100_000
_MAX_PROBLEMS = 100
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR = re.compile(r"\$\{([^}]*)\}")
_IPC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_IPC_NAME = 64  # kvcached cuts KVCACHED_IPC_NAME there
_RESERVED_NAMES = {"router", "supervisord", "supervisor"}
# AF_UNIX paths are limited to 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 100


# --------------------------------------------------------------------------- converters
# Checks that need the reader (${VAR} expansion, the file's directory, positions of items);
# plain checks are kvctl.settings' Bool, Number, Integer and Choice.


def _expand(reader: _Reader, value: str, pos: Pos) -> str | object:
    """Replace ${VAR} from the environment; an unset or malformed one is an error."""
    bad = False

    def sub(match: re.Match[str]) -> str:
        nonlocal bad
        name = match.group(1)
        if not _ENV_KEY.match(name):
            reader.error(pos, f"'${{{clip(name)}}}' is not a valid environment variable reference")
            bad = True
            return ""
        if name not in os.environ:
            reader.error(pos, f"environment variable '{clip(name)}' is not set")
            bad = True
            return ""
        return os.environ[name]

    result = _VAR.sub(sub, value)
    return INVALID if bad else result


def _string(reader: _Reader, value: Any, pos: Pos) -> Any:
    if not isinstance(value, str):
        reader.error(pos, f"expected a string, got {describe(value)}")
        return INVALID
    return _expand(reader, value, pos)


def _nonempty_string(reader: _Reader, value: Any, pos: Pos) -> Any:
    result = _string(reader, value, pos)
    if result == "":
        reader.error(pos, "must not be empty")
        return INVALID
    return result


_port = Integer(1, 65535)


def _memory_gb(reader: _Reader, value: Any, pos: Pos) -> Any:
    """A number of GB, or `auto`: measured per engine process through NVML, which must be there."""
    if value != "auto":
        return Number(positive=True, optional=True)(reader, value, pos)
    from kvctl import gpu

    reason = gpu.unavailable_reason()
    if reason is not None:
        reader.error(pos, f"'auto' needs each engine's GPU memory from NVML, which is not available here ({reason}); give a number of GB")
        return INVALID
    return value


def _engine(reader: _Reader, value: Any, pos: Pos) -> Any:
    try:
        return engines.engine_name(value)
    except ValueError as exc:
        reader.error(pos, str(exc))
        return INVALID


def _path(reader: _Reader, value: Any, pos: Pos) -> Any:
    text = _nonempty_string(reader, value, pos)
    if text is INVALID:
        return INVALID
    # abspath, not resolve(): a venv's bin/python is a symlink, and following it would
    # run the base interpreter outside the venv.
    return Path(os.path.abspath(reader.file.parent / Path(text).expanduser()))


def _list_of(item_convert: Convert) -> Convert:
    def convert(reader: _Reader, value: Any, pos: Pos) -> Any:
        if not isinstance(value, CommentedSeq):
            reader.error(pos, f"expected a list of strings, got {describe(value)}")
            return INVALID
        out = []
        for index, item in enumerate(value):
            converted = item_convert(reader, item, value.lc.item(index))
            if converted is not INVALID:
                out.append(converted)
        return tuple(out)

    return convert


def _secret(reader: _Reader, value: Any, pos: Pos) -> Any:
    """An API key or admin token; messages never show it."""
    text = _string(reader, value, pos)
    if text is not INVALID and (not text or any(ch.isspace() or not ch.isprintable() for ch in text)):
        # Clients send it as `Authorization: Bearer KEY`: blank or spaced keys can never match.
        reader.error(pos, "must not be empty or contain spaces or control characters")
        return INVALID
    return text


def _optional_secret(reader: _Reader, value: Any, pos: Pos) -> Any:
    return None if value is None else _secret(reader, value, pos)


def _args(reader: _Reader, value: Any, pos: Pos) -> Any:
    """A string or a list; each item is split like a shell word list (never run by a shell)."""
    items: list[tuple[Any, Pos]]
    if isinstance(value, str):
        items = [(value, pos)]
    elif isinstance(value, CommentedSeq):
        items = [(item, value.lc.item(i)) for i, item in enumerate(value)]
    else:
        reader.error(pos, f"expected a string or a list of strings, got {describe(value)}")
        return INVALID
    out: list[str] = []
    for item, item_pos in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        text = _string(reader, item, item_pos)
        if text is INVALID:
            continue
        try:
            words = shlex.split(text)
        except ValueError as exc:
            reader.error(item_pos, f"cannot split engine argument {quote(text)}: {exc}")
            continue
        for word in words:
            if "\n" in word or "\r" in word or "\0" in word:
                reader.error(item_pos, f"engine argument {quote(word)} contains a newline or NUL")
            else:
                out.append(word)
    return out


def _env_value(reader: _Reader, value: Any, pos: Pos) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    text = _string(reader, value, pos)
    if text is not INVALID and "\0" in text:
        reader.error(pos, "environment values cannot contain NUL")
        return INVALID
    return text


def _env(reader: _Reader, value: Any, pos: Pos) -> Any:
    """`["KEY=VALUE", ...]` or a mapping."""
    out: dict[str, str] = {}
    if isinstance(value, CommentedSeq):
        for index, item in enumerate(value):
            item_pos = value.lc.item(index)
            if not isinstance(item, str) or "=" not in item:
                reader.error(item_pos, f"expected 'KEY=VALUE', got {quote(item)}")
                continue
            key, _, raw = item.partition("=")
            converted = _env_value(reader, raw, item_pos)
            if not _ENV_KEY.match(key):
                reader.error(item_pos, f"'{clip(str(key))}' is not a valid environment variable name")
            elif converted is not INVALID:
                out[key] = converted
    elif isinstance(value, CommentedMap):
        for key in value:
            if not isinstance(key, str) or not _ENV_KEY.match(key):
                reader.error(_key_pos(value, key, pos), f"'{clip(str(key))}' is not a valid environment variable name")
                continue
            converted = _env_value(reader, value[key], _value_pos(value, key, pos))
            if converted is not INVALID:
                out[key] = converted
    elif value is not None:
        reader.error(pos, f"expected a list of 'KEY=VALUE' strings or a mapping, got {describe(value)}")
        return INVALID
    return out


def _kvcached(reader: _Reader, value: Any, pos: Pos) -> Any:
    """The kvcached block: keys upper-cased into every engine's environment."""
    if value is None:
        return {}
    if not isinstance(value, CommentedMap):
        reader.error(pos, f"expected a mapping, got {describe(value)}")
        return INVALID
    env = _env(reader, value, pos)
    return {key.upper(): val for key, val in env.items()}


def _section(where: str, fields: dict[str, Setting]) -> Convert:
    def convert(reader: _Reader, value: Any, pos: Pos) -> Any:
        return reader.mapping(value, pos, where, fields)

    return convert


# --------------------------------------------------------------------------- the schema
# Each setting once: its dataclass field says its default, its check and its line in
# docs/config.md (`reference_tables`); the key tables below are derived from the fields.

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
        _nonempty_string,
        "process name: letters, digits, `_`, `.`, `-`, at most 64; unique; `router`, `supervisor`, `supervisord` are reserved",
        type_text="string",
        default_text="last part of `model`",
    )
    model: str = setting(
        dataclasses.MISSING,
        _nonempty_string,
        "the model name clients ask for (the routing key); several instances of one model are replicas",
        type_text="string",
    )
    engine: str = setting(dataclasses.MISSING, _engine, "the engine (case-insensitive)", type_text=engines.NAMES_DOC)
    host: str = setting(dataclasses.MISSING, _nonempty_string, "the engine's address", type_text="string", default_text="from `--host`, else `127.0.0.1`")
    port: int = setting(
        dataclasses.MISSING,
        _port,
        "the engine's port (one of the two is required; then kvctl adds `--port`)",
        type_text="port",
        default_text="from `--port` in `engine_args`",
    )
    # engine args as given (split), kvctl's own --host/--port not included
    args: tuple[str, ...] = setting(
        dataclasses.MISSING,
        _args,
        "the engine's own arguments; each item split like shell words (never run by a shell)",
        key="engine_args",
        type_text="string or list of strings",
        default_text="`[]`",
    )
    python: str = setting(
        dataclasses.MISSING, _path, "the engine's interpreter when not using a venv", type_text="path", default_text="the interpreter kvctl runs on"
    )
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # kvcached block, kvcached_env, engine_env, KVCACHED_IPC_NAME
    aliases: tuple[str, ...] = setting(
        (),
        _list_of(_nonempty_string),
        "more model names; a request naming one is forwarded with `model` set to this instance's model",
        type_text="list of strings",
    )
    memory_gb: float | None = setting(
        None,
        _memory_gb,
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
        SleepSettings(), _section("sleep", _SLEEP_FIELDS), "how this instance sleeps", type_text="mapping", default_text="see [sleep](#sleep)"
    )
    startup_timeout_seconds: float = setting(900.0, _SECONDS_POSITIVE, "how long a start may take until the health check passes")
    startretries: int = setting(
        3,
        Integer(0),
        "failed starts in a row (with back-off) before it stays stopped in state `failed`; `kvctl restart NAME` tries again",
    )
    sim: SimSettings = setting(SimSettings(), _section("sim", _SIM_FIELDS), "settings of `engine: sim`", type_text="mapping", default_text="see [sim](#sim)")
    external: bool = setting(False, Bool(), "already running elsewhere: routed, not launched")
    add_host_flag: bool = False  # host/port came from kvctl keys, so kvctl passes the flags
    add_port_flag: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


# Keys of an instance that feed other attributes (`env`, `python`) rather than one of their own.
_INSTANCE_INPUTS = {
    "engine_env": Setting(_env, "environment of the engine", type_text="list of `KEY=VALUE` or mapping", default_text="`{}`"),
    "kvcached_env": Setting(_env, "environment of the engine (kvcached's settings)", type_text="list of `KEY=VALUE` or mapping", default_text="`{}`"),
    "using_venv": Setting(Bool(), "run the engine with `venv_path`'s `bin/python`", default=False),
    "venv_path": Setting(_path, "the engine's virtualenv", type_text="path", default=None),
}
_INSTANCE_FIELDS = {**fields_of(Instance), **_INSTANCE_INPUTS}
_INSTANCE_ATTRS = {spec.attr for spec in _INSTANCE_FIELDS.values()}
_INSTANCE_ALIASES = {"args": "engine_args"}


@dataclass(frozen=True)
class RouterConfig:
    enabled: bool = setting(True, Bool(), "run the router at all", key="enable_router")
    host: str = setting(
        "127.0.0.1",
        _nonempty_string,
        "address the router binds; a non-loopback address needs `api_keys` or `allow_unauthenticated: true`",
        key="router_host",
        type_text="string",
    )
    port: int = setting(8080, _port, "the router's port; no instance may use it", key="router_port", type_text="port")
    api_keys: tuple[str, ...] = setting(
        (),
        _list_of(_secret),
        "keys clients send as `Authorization: Bearer KEY`; each non-empty, without spaces",
        type_text="list of strings",
        default_text="`[]` (no auth)",
    )
    admin_token: str | None = setting(
        None,
        _optional_secret,
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
        _section("router", _ROUTER_FIELDS),
        "the OpenAI-compatible router in front of the engines",
        type_text="mapping",
        default_text="see [router](#router)",
    )
    sleep_manager: SleepManagerConfig = setting(
        dataclasses.MISSING,
        _section("sleep_manager", _SLEEP_MANAGER_FIELDS),
        "when and how models sleep and wake",
        type_text="mapping",
        default_text="see [sleep_manager](#sleep_manager)",
    )
    run_dir: Path = setting(
        dataclasses.MISSING,
        _nonempty_string,
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

    def kvcached_ipc_name(self, inst: Instance) -> str:
        """The instance's KVCACHED_IPC_NAME (its /dev/shm segment name, unique per instance)."""
        return kvcached_ipc_name(inst.name)

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)


_TOP_FIELDS = {
    **fields_of(Config),
    "kvcached": Setting(
        _kvcached,
        "kvcached settings; each key is upper-cased into every engine's environment (`kvcached_gpu_utilization: 0.95` → `KVCACHED_GPU_UTILIZATION=0.95`)",
        type_text="mapping",
        default_text="`{}`",
    ),
}
# docs/config.md's headings -> the key table under each
REFERENCE = {
    "## Top level": _TOP_FIELDS,
    "## router": _ROUTER_FIELDS,
    "## sleep_manager": _SLEEP_MANAGER_FIELDS,
    "## instances": _INSTANCE_FIELDS,
    "### sleep": _SLEEP_FIELDS,
    "### sim": _SIM_FIELDS,
}


def reference_tables() -> dict[str, str]:
    """docs/config.md's heading -> the Markdown table of every key in that section."""
    return {heading: reference_table(table, _INSTANCE_ALIASES if table is _INSTANCE_FIELDS else None) for heading, table in REFERENCE.items()}


def kvcached_ipc_name(name: str) -> str:
    """`kvctl_` + the instance name as kvcached would sanitise it (every character but letters,
    digits, '_' and '-' becomes '-', at most 64), so kvcached uses it unchanged."""
    return ("kvctl_" + _IPC_UNSAFE.sub("-", name))[:_MAX_IPC_NAME]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """-c/--config, then $KVCTL_CONFIG, then ./kvctl.yaml."""
    chosen = path or os.environ.get("KVCTL_CONFIG") or DEFAULT_PATH
    return Path(chosen).expanduser().absolute()


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    file = resolve_path(path)
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)  # never more: the size is checked before parsing
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError([_too_big(file)])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such config file (use -c PATH or set KVCTL_CONFIG)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc}"]) from None
    return parse(text, file)


def parse(text: str, file: Path) -> Config:
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError([_too_big(file)])
    long_line = next((i for i, line in enumerate(text.splitlines()) if len(line) > MAX_LINE_CHARS), None)
    if long_line is not None:
        # ruamel scans some long lines (a comment after a value) in quadratic time.
        raise ConfigError([f"{file}:{long_line + 1}:{MAX_LINE_CHARS + 1}: line {long_line + 1} is longer than {MAX_LINE_CHARS} characters"])
    yaml = YAML(typ="rt")
    yaml.Composer = _GuardedComposer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReusedAnchorWarning)  # YAML allows redefining an anchor
            data = yaml.load(text)
    except MarkedYAMLError as exc:
        (line, col), problem = _yaml_problem(exc, text)
        raise ConfigError([f"{file}:{line + 1}:{col + 1}: {problem}"]) from None
    reader = _Reader(file)
    config = reader.config(data)
    if reader.problems:
        shown = reader.problems[:_MAX_PROBLEMS]
        if len(reader.problems) > _MAX_PROBLEMS:
            shown.append(f"{file}: … and {len(reader.problems) - _MAX_PROBLEMS} more problems")
        raise ConfigError(shown)
    assert config is not None
    return config


def _too_big(file: Path) -> str:
    return f"{file}: the config file is larger than {MAX_FILE_BYTES // 1024} KiB (a kvctl.yaml needs a few KiB)"


class _LimitError(MarkedYAMLError):
    """The file breaks one of the loader's limits (its message needs no "YAML syntax error")."""


class _GuardedComposer(Composer):
    """ruamel's composer, bounded before anything recurses deeply or expands aliases:
    nesting depth, the number of values with every alias expanded, plain mapping keys."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self._level = 0
        self._sizes: dict[int, int] = {}  # id(collection node) -> values in it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(parent, MappingNode) and index is None and not isinstance(event, ScalarEvent):
            # An alias of a list as a key is unhashable; kvctl never needs a non-scalar key.
            raise _LimitError(None, None, "a mapping key must be a plain value, not an alias, a list or a mapping", event.start_mark)
        collection = isinstance(event, (SequenceStartEvent, MappingStartEvent))
        if collection and self._level >= MAX_DEPTH:
            raise _LimitError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._level += collection
        try:
            node = super().compose_node(parent, index)
        finally:
            self._level -= collection
        if collection:
            children = node.value if isinstance(node, SequenceNode) else [child for pair in node.value for child in pair]
            size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
            if size > MAX_VALUES:
                raise _LimitError(None, None, f"this expands to more than {MAX_VALUES} values (each use of a YAML alias counts)", event.start_mark)
            self._sizes[id(node)] = size
        return node


def _yaml_problem(exc: MarkedYAMLError, text: str) -> tuple[tuple[int, int], str]:
    """ruamel's error as a position and a message in words (indentation mistakes named as such)."""
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line, mark.column) if mark else (0, 0)
    problem = str(exc.problem or exc.context or "invalid YAML")
    if isinstance(exc, _LimitError):
        return (line, col), problem
    lines = text.splitlines()
    here = lines[line] if line < len(lines) else ""
    key = _KEY_LINE.match(here)
    # A key indented differently from its neighbours: ruamel sees a scalar continued by a
    # stray ':' (deeper) or a block that ends where none can (shallower).
    if key and (
        (problem.startswith("expected <block end>") and col == key.start(2)) or (problem == "mapping values are not allowed here" and col == key.end(3))
    ):
        return (line, key.start(3)), _misaligned(lines, line, key)
    if problem == "mapping values are not allowed here":
        return (line, col), "YAML syntax error: ': ' inside a value (quote the value)"
    if problem == "could not find expected ':'" and exc.context_mark:
        return (exc.context_mark.line, exc.context_mark.column), "YAML syntax error: a line in a mapping without 'key: value' (missing ':'?)"
    if "'\\t'" in problem:
        return (line, col), "YAML syntax error: a tab character; YAML indents with spaces only"
    if "duplicate key" in problem:
        problem = problem.split(" with value")[0]
    return (line, col), f"YAML syntax error: {clip(problem, 120)}"


# `  - key: value`: group 1 the indentation, 2 the item/key start, 3 the key.
_KEY_LINE = re.compile(r"^( *)((?:- +)*)([^\s#:-][^#:]*?) *:(?:\s|$)")


def _misaligned(lines: list[str], line: int, key: re.Match[str]) -> str:
    own = f"bad indentation: '{clip(key.group(3), 40)}' (column {key.start(3) + 1})"
    for above in range(line - 1, -1, -1):
        prev = _KEY_LINE.match(lines[above])
        if prev:
            return f"{own} is not aligned with '{clip(prev.group(3), 40)}' (column {prev.start(3) + 1}) on line {above + 1}"
    return f"{own} does not match the indentation of the lines above"


# --------------------------------------------------------------------------- reading


class _Reader:
    """Walks the YAML tree once, converting values and recording problems with positions."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.key: str | None = None  # the key whose value is being converted; messages start with it

    # -- reporting
    def error(self, pos: tuple[int, int], message: str) -> None:
        prefix = f"{self.key}: " if self.key else ""
        self.problems.append(f"{self.file}:{pos[0] + 1}:{pos[1] + 1}: {prefix}{message}")

    def warn(self, pos: tuple[int, int], message: str) -> None:
        self.warnings.append(f"{self.file}:{pos[0] + 1}:{pos[1] + 1}: warning: {message}")

    # -- structure
    def mapping(self, node: Any, pos: tuple[int, int], where: str, fields: dict[str, Setting], aliases: dict[str, str] | None = None) -> dict[str, Any]:
        """Convert a mapping against `fields`; unknown keys are errors with a did-you-mean."""
        if node is None:
            return {}
        if not isinstance(node, CommentedMap):
            self.error(pos, f"expected a mapping, got {describe(node)}" if self.key else f"{where} must be a mapping, got {describe(node)}")
            return {}
        outer, self.key = self.key, None
        try:
            return self._fields(node, pos, where, fields, aliases or {})
        finally:
            self.key = outer

    def _fields(self, node: CommentedMap, pos: tuple[int, int], where: str, fields: dict[str, Setting], aliases: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen_by: dict[str, str] = {}
        for key in node:
            key_pos = _key_pos(node, key, pos)
            name = aliases.get(key, key)
            if not isinstance(key, str) or name not in fields:
                hint = difflib.get_close_matches(str(key), [*fields, *aliases], n=1)
                self.error(key_pos, f"unknown key '{clip(str(key))}' in {where}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
                continue
            if name in seen_by:
                self.error(key_pos, f"'{key}' and '{seen_by[name]}' in {where} mean the same; give only one")
                continue
            seen_by[name] = key
            spec = fields[name]
            self.key = key
            value = spec.convert(self, node[key], _value_pos(node, key, key_pos))
            self.key = None
            if value is not INVALID:
                out[spec.attr or name] = value
        return out

    # -- top level
    def config(self, data: Any) -> Config | None:
        root_pos = (0, 0)
        if data is None:
            self.error(root_pos, "the config file is empty")
            return None
        top = self.mapping(data, root_pos, "the top level", _TOP_FIELDS)
        router = RouterConfig(**top.get("router", {}))
        sleep_manager = SleepManagerConfig(**top.get("sleep_manager", {}))
        kvcached_env: dict[str, str] = top.get("kvcached", {})
        run_dir = self.file.parent / top.get("run_dir", ".kvctl")
        raw_instances = data.get("instances") if isinstance(data, CommentedMap) else None
        placed: list[_Placed] = []
        if "instances" not in top and "instances" not in (data or {}):
            self.error(root_pos, "missing key 'instances' (a list of engines to run)")
        elif isinstance(raw_instances, CommentedSeq):
            for index, item in enumerate(raw_instances):
                item_pos = raw_instances.lc.item(index)
                inst = self.instance(item, item_pos, index, kvcached_env, sleep_manager)
                if inst is not None:
                    placed.append((inst, item_pos, item))
            if not raw_instances:
                self.error(_value_pos(data, "instances", root_pos), "'instances' is empty: configure at least one engine")
        elif "instances" in data:
            self.error(_value_pos(data, "instances", root_pos), f"'instances' must be a list, got {describe(raw_instances)}")
        self.cross_checks(data, placed, router, run_dir)
        self.literal_secrets_warning(data)
        self.budget_checks(placed, sleep_manager)
        self.kv_checks(data, placed, sleep_manager)
        return Config(
            path=self.file,
            run_dir=run_dir,
            router=router,
            sleep_manager=sleep_manager,
            instances=tuple(inst for inst, _, _ in placed),
            launch_delay_seconds=top.get("launch_delay_seconds", 0.0),
            warnings=tuple(self.warnings),
            secret_env=_secret_env(data),
        )

    def instance(self, node: Any, pos: tuple[int, int], index: int, kvcached_env: dict[str, str], sm: SleepManagerConfig) -> Instance | None:
        where = f"instances[{index}]"
        raw = self.mapping(node, pos, where, _INSTANCE_FIELDS, aliases=_INSTANCE_ALIASES)
        if not isinstance(node, CommentedMap):
            return None

        def at(key: str) -> tuple[int, int]:
            return _value_pos(node, key, pos)

        ok = True
        for key in ("model", "engine"):
            if key not in raw and key not in node:
                self.error(pos, f"{where}: missing required key '{key}'")
                ok = False
        model = raw.get("model")
        engine = raw.get("engine")
        if model is None or engine is None:
            return None
        name = raw.get("name") or model.rstrip("/").rsplit("/", 1)[-1]
        if not _SAFE_NAME.match(name):
            self.error(
                at("name") if "name" in node else at("model"),
                f"{where}: name '{clip(name)}' is not safe as a process name (letters, digits, '_', '.', '-'; at most 64; set 'name:')",
            )
            ok = False
        elif name in _RESERVED_NAMES:
            self.error(at("name") if "name" in node else at("model"), f"{where}: name '{name}' is reserved by kvctl")
            ok = False

        args: list[str] = raw.get("args", [])
        arg_host, arg_port = _flag_value(args, "--host"), _flag_value(args, "--port")
        host = raw.get("host") or arg_host or "127.0.0.1"
        if "host" in raw and arg_host is not None and arg_host != raw["host"]:
            self.error(at("host"), f"{where}: host '{clip(raw['host'])}' disagrees with --host {clip(arg_host)} in engine_args")
        port = raw.get("port")
        if arg_port is not None:
            try:
                parsed = int(arg_port)
                if not 1 <= parsed <= 65535:
                    raise ValueError
            except ValueError:
                self.error(at("engine_args"), f"{where}: --port '{clip(arg_port)}' in engine_args is not a port number")
                ok = False
            else:
                if port is not None and port != parsed:
                    self.error(at("port"), f"{where}: port {port} disagrees with --port {parsed} in engine_args")
                port = parsed
        if port is None and "port" not in node:
            self.error(pos, f"{where}: no port: set 'port:' or pass --port in engine_args")
            ok = False

        external = raw.get("external", Instance.external)
        python = self.python_for(raw, node, where, at, external)
        env = dict(kvcached_env)
        env.update(raw.get("kvcached_env", {}))
        env.update(raw.get("engine_env", {}))
        ipc = kvcached_ipc_name(name)
        if env.get("KVCACHED_IPC_NAME", ipc) != ipc:
            self.warn(
                at("kvcached_env") if "kvcached_env" in node else pos,
                f"{where}: KVCACHED_IPC_NAME={clip(env['KVCACHED_IPC_NAME'])} replaced by {ipc} (it must be unique per instance)",
            )
        env["KVCACHED_IPC_NAME"] = ipc

        sleep_raw = raw.get("sleep", {})
        sleep = SleepSettings(**{"level": sm.vllm_sleep_level, "mode": sm.vllm_sleep_mode, **sleep_raw}, start_explicit="start" in sleep_raw)
        if not ok or port is None or python is None:
            return None
        resolved = {
            "name": name,
            "engine": engine,
            "host": host,
            "port": port,
            "args": tuple(args),
            "env": env,
            "python": python,
            "memory_gb": None if raw.get("memory_gb") == "auto" else raw.get("memory_gb"),
            "memory_auto": raw.get("memory_gb") == "auto",
            "sleep": sleep,
            "sim": SimSettings(**raw.get("sim", {})),
            "add_host_flag": arg_host is None,
            "add_port_flag": arg_port is None,
        }
        # Every other key is its attribute as read (its default when absent).
        inst = Instance(**{**{key: value for key, value in raw.items() if key in _INSTANCE_ATTRS}, **resolved})
        if not external:
            for message in engines.adapter_for(inst).config_warnings(inst):
                self.warn(pos, f"{where} ({name}): {message}")
        return inst

    def python_for(self, raw: dict[str, Any], node: CommentedMap, where: str, at: Callable[[str], tuple[int, int]], external: bool) -> str | None:
        if raw.get("using_venv", False) and "venv_path" in node:
            venv = raw.get("venv_path")
            if venv is None:
                return None
            python = venv / "bin" / "python"
            if not external and not os.access(python, os.X_OK):
                self.error(at("venv_path"), f"{where}: venv_path '{clip(str(venv))}' has no executable bin/python")
                return None
            return str(python)
        if raw.get("using_venv", False):
            self.error(at("using_venv"), f"{where}: using_venv is true but venv_path is not set")
            return None
        if "python" in raw:
            python = raw["python"]
            if not external and not os.access(python, os.X_OK):
                self.error(at("python"), f"{where}: python '{clip(str(python))}' is not an executable file")
                return None
            return str(python)
        return sys.executable

    def cross_checks(self, data: Any, placed: list[_Placed], router: RouterConfig, run_dir: Path) -> None:
        """Problems that need more than one instance: duplicates and port clashes."""
        names: set[str] = set()
        ports: dict[int, str] = {}
        models = {inst.model for inst, _, _ in placed}
        aliases: dict[str, str] = {}
        router_node = data.get("router") if isinstance(data, CommentedMap) else None
        router_pos = _pos_of(router_node, "router_host", _pos_of(data, "router", (0, 0)))
        ipc_names: dict[str, str] = {}
        for inst, pos, node in placed:
            if inst.name in names:
                self.error(pos, f"duplicate instance name '{inst.name}' (give each replica its own 'name:')")
            else:
                ipc = kvcached_ipc_name(inst.name)
                if ipc in ipc_names:
                    self.error(
                        _pos_of(node, "name", _pos_of(node, "model", pos)),
                        f"instance '{inst.name}': its kvcached IPC name '{ipc}' is also that of instance '{ipc_names[ipc]}' "
                        "(only letters, digits, '_' and '-' count, at most 64); rename one",
                    )
                ipc_names.setdefault(ipc, inst.name)
            names.add(inst.name)
            if inst.port in ports and not inst.external:
                self.error(_port_pos(node, pos), f"instance '{inst.name}': port {inst.port} is already used by instance '{ports[inst.port]}'")
            ports.setdefault(inst.port, inst.name)
            if router.enabled and inst.port == router.port:
                self.error(_port_pos(node, pos), f"instance '{inst.name}': port {inst.port} is the router's port")
            for alias in inst.aliases:
                if alias in models:
                    self.error(pos, f"instance '{inst.name}': alias '{clip(alias)}' is also a model name")
                elif aliases.get(alias, inst.model) != inst.model:
                    self.error(pos, f"instance '{inst.name}': alias '{clip(alias)}' already names model '{clip(aliases[alias])}'")
                aliases[alias] = inst.model
        if not router.is_loopback and not router.api_keys:
            if router.allow_unauthenticated:
                self.warn(router_pos, f"router binds non-loopback host '{clip(router.host)}' with no api_keys: anyone who can reach it can use it")
            else:
                self.error(
                    router_pos,
                    f"router binds non-loopback host '{clip(router.host)}' with no api_keys; set router.api_keys or router.allow_unauthenticated: true",
                )
        if len(str(run_dir / "supervisor.sock")) > _MAX_SOCKET_PATH:
            self.error(_pos_of(data, "run_dir", (0, 0)), f"run_dir '{clip(str(run_dir))}' is too long for a unix socket path; choose a shorter run_dir")

    def literal_secrets_warning(self, data: Any) -> None:
        """Keys written into a file that others can read are keys others have."""
        router = data.get("router") if isinstance(data, CommentedMap) else None
        if not isinstance(router, CommentedMap):
            return
        keys = router.get("api_keys")
        literal = [
            key
            for key, values in (("api_keys", keys if isinstance(keys, CommentedSeq) else ()), ("admin_token", [router.get("admin_token")]))
            if any(isinstance(v, str) and _VAR.sub("", v).strip() for v in values)
        ]
        if not literal:
            return
        try:
            mode = self.file.stat().st_mode & 0o777
        except OSError:
            return  # parsed from text, not a file
        if mode & 0o077:
            self.warn(
                _key_pos(router, literal[0], (0, 0)),
                f"router.{' and router.'.join(literal)} written in the file, which group/others can read "
                f"(mode {mode:04o}): chmod 600 {self.file.name}, or use ${{VAR}} to take them from the environment",
            )

    def budget_checks(self, placed: list[_Placed], sm: SleepManagerConfig) -> None:
        """Refuse what can never fit memory_budget_gb, instead of requests waiting for it forever."""
        budget = sm.memory_budget_gb
        if budget is None:
            return
        pinned = 0.0
        for inst, pos, node in placed:
            if inst.memory_gb is None:
                continue
            at = _pos_of(node, "memory_gb", pos)
            if inst.memory_gb > budget:
                self.error(
                    at, f"instance '{inst.name}': memory_gb {inst.memory_gb:g} exceeds sleep_manager.memory_budget_gb {budget:g}: it could never be awake"
                )
            elif not inst.sleep.enabled or (inst.sleep.start_explicit and inst.sleep.start == "awake"):
                # Pinned: never sleeps, or must be awake after `up` because the file says so.
                pinned += inst.memory_gb
                if pinned > budget and pinned - inst.memory_gb <= budget:
                    self.error(
                        at,
                        f"instance '{inst.name}': instances that never sleep (sleep.enabled: false) or start awake (start: awake) "
                        f"need {pinned:g} GB together with this one, more than sleep_manager.memory_budget_gb {budget:g}",
                    )

    def kv_checks(self, data: Any, placed: list[_Placed], sm: SleepManagerConfig) -> None:
        """kvcached settings that cannot work (SPEC §13)."""
        node = data.get("sleep_manager") if isinstance(data, CommentedMap) else None
        at = _pos_of(node, "kv_rebalance", _pos_of(data, "sleep_manager", (0, 0)))
        if sm.kv_rebalance and sm.kv_budget_gb is None:
            self.error(at, "kv_rebalance: needs sleep_manager.kv_budget_gb (the KV limits of the awake kvcached instances together)")
        elif sm.kv_budget_gb is not None and sm.kv_min_gb > sm.kv_budget_gb:
            self.error(_pos_of(node, "kv_min_gb", at), f"kv_min_gb: {sm.kv_min_gb:g} is more than kv_budget_gb {sm.kv_budget_gb:g}")
        for inst, pos, inode in placed:
            if inst.kv_limit_gb is not None and not kvcached.enabled(inst.env):
                self.warn(
                    _pos_of(inode, "kv_limit_gb", pos),
                    f"instance '{inst.name}': kv_limit_gb is set but ENABLE_KVCACHED=true is not in its environment: no segment to limit",
                )


_Placed = tuple[Instance, tuple[int, int], CommentedMap]  # an instance, its list item's position, its node


def _pos_of(node: Any, key: str, default: tuple[int, int]) -> tuple[int, int]:
    return _key_pos(node, key, default) if isinstance(node, CommentedMap) else default


def _key_pos(node: CommentedMap, key: Any, default: tuple[int, int]) -> tuple[int, int]:
    """Where `key` is written in `node`; `default` when it is not (e.g. it came with a `<<:` merge)."""
    place = node.lc.data.get(key)
    return (place[0], place[1]) if place else default


def _value_pos(node: CommentedMap, key: Any, default: tuple[int, int]) -> tuple[int, int]:
    place = node.lc.data.get(key)
    return (place[2], place[3]) if place else default


def _port_pos(node: CommentedMap, default: tuple[int, int]) -> tuple[int, int]:
    """Where an instance sets its port: the `port:` key, else the engine_args item holding --port."""
    if "port" in node:
        return _key_pos(node, "port", default)
    for key in ("engine_args", "args"):
        args = node.get(key)
        if isinstance(args, CommentedSeq):
            holding = [i for i, item in enumerate(args) if isinstance(item, str) and _PORT_FLAG.search(item)]
            if holding:
                line, col = args.lc.item(holding[-1])
                return int(line), int(col)
        if key in node:
            return _value_pos(node, key, default)
    return default


_PORT_FLAG = re.compile(r"(?:^|\s)--port(?:=|\s|$)")


def _secret_env(data: Any) -> tuple[str, ...]:
    """Names of the variables that router.api_keys and router.admin_token take from the environment."""
    router = data.get("router") if isinstance(data, CommentedMap) else None
    if not isinstance(router, CommentedMap):
        return ()
    keys = router.get("api_keys")
    values = [*(keys if isinstance(keys, CommentedSeq) else ()), router.get("admin_token")]
    names = (name for value in values if isinstance(value, str) for name in _VAR.findall(value))
    return tuple(dict.fromkeys(names))


def _flag_value(args: list[str], flag: str) -> str | None:
    """Value of `--flag V` or `--flag=V` in an argument list (the last one wins, like argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def env_digest(env: Mapping[str, str]) -> str:
    """A short digest of an environment, so a changed value changes the rendered config."""
    text = "\0".join(f"{k}={v}" for k, v in sorted(env.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "Config",
    "Instance",
    "RouterConfig",
    "SimSettings",
    "SleepManagerConfig",
    "SleepSettings",
    "env_digest",
    "is_loopback",
    "kvcached_ipc_name",
    "load",
    "parse",
    "resolve_path",
]
