"""Reading a kvctl.yaml tree against the schema: every value checked, every problem reported as
``FILE:LINE:COL: message`` (unknown keys with a did-you-mean).

Loading collects all problems before raising one ConfigError, so an operator fixes a file
in one pass.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from kvctl import engines, kvcached
from kvctl.config import checks
from kvctl.config.checks import VAR_REFERENCE
from kvctl.config.positions import key_pos, port_pos, pos_of, value_pos
from kvctl.config.schema import (
    INSTANCE_ALIASES,
    INSTANCE_ATTRS,
    INSTANCE_FIELDS,
    TOP_FIELDS,
    Config,
    Instance,
    RouterConfig,
    SleepManagerConfig,
    SleepSettings,
    kvcached_ipc_name,
)
from kvctl.config.yaml_load import load_yaml, read_text, resolve_path
from kvctl.errors import ConfigError
from kvctl.settings import INVALID, Setting, clip, describe
from kvctl.sim.settings import SimSettings

_MAX_PROBLEMS = 100
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED_NAMES = {"router", "supervisord", "supervisor"}
# AF_UNIX paths are limited to 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 100

_Placed = tuple[Instance, tuple[int, int], CommentedMap]  # an instance, its list item's position, its node


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    file = resolve_path(path)
    return parse(read_text(file), file)


def parse(text: str, file: Path) -> Config:
    reader = Reader(file)
    config = reader.config(load_yaml(text, file))
    if reader.problems:
        shown = reader.problems[:_MAX_PROBLEMS]
        if len(reader.problems) > _MAX_PROBLEMS:
            shown.append(f"{file}: … and {len(reader.problems) - _MAX_PROBLEMS} more problems")
        raise ConfigError(shown)
    assert config is not None
    return config


class Reader:
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
            key_at = key_pos(node, key, pos)
            name = aliases.get(key, key)
            if not isinstance(key, str) or name not in fields:
                hint = difflib.get_close_matches(str(key), [*fields, *aliases], n=1)
                self.error(key_at, f"unknown key '{clip(str(key))}' in {where}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
                continue
            if name in seen_by:
                self.error(key_at, f"'{key}' and '{seen_by[name]}' in {where} mean the same; give only one")
                continue
            seen_by[name] = key
            spec = fields[name]
            self.key = key
            value = spec.convert(self, node[key], value_pos(node, key, key_at))
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
        top = self.mapping(data, root_pos, "the top level", TOP_FIELDS)
        router = RouterConfig(**top.get("router", {}))
        sleep_manager = SleepManagerConfig(**top.get("sleep_manager", {}))
        kvcached_env: dict[str, str] = top.get("kvcached", {})
        run_dir = self.file.parent / top.get("run_dir", ".kvctl")
        raw_instances = data.get("instances") if isinstance(data, CommentedMap) else None
        placed: list[_Placed] = []
        if not isinstance(data, CommentedMap) or "instances" not in data:
            self.error(root_pos, "missing key 'instances' (a list of engines to run)")
        elif isinstance(raw_instances, CommentedSeq):
            for index, item in enumerate(raw_instances):
                item_pos = raw_instances.lc.item(index)
                inst = self.instance(item, item_pos, index, kvcached_env, sleep_manager)
                if inst is not None:
                    placed.append((inst, item_pos, item))
            if not raw_instances:
                self.error(value_pos(data, "instances", root_pos), "'instances' is empty: configure at least one engine")
        elif "instances" in data:
            self.error(value_pos(data, "instances", root_pos), f"'instances' must be a list, got {describe(raw_instances)}")
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
        raw = self.mapping(node, pos, where, INSTANCE_FIELDS, aliases=INSTANCE_ALIASES)
        if not isinstance(node, CommentedMap):
            return None

        def at(key: str) -> tuple[int, int]:
            return value_pos(node, key, pos)

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
                if checks.port.problem(parsed) is not None:
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
        inst = Instance(**{**{key: value for key, value in raw.items() if key in INSTANCE_ATTRS}, **resolved})
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
        router_pos = pos_of(router_node, "router_host", pos_of(data, "router", (0, 0)))
        ipc_names: dict[str, str] = {}
        for inst, pos, node in placed:
            if inst.name in names:
                self.error(pos, f"duplicate instance name '{inst.name}' (give each replica its own 'name:')")
            else:
                ipc = kvcached_ipc_name(inst.name)
                if ipc in ipc_names:
                    self.error(
                        pos_of(node, "name", pos_of(node, "model", pos)),
                        f"instance '{inst.name}': its kvcached IPC name '{ipc}' is also that of instance '{ipc_names[ipc]}' "
                        "(only letters, digits, '_' and '-' count, at most 64); rename one",
                    )
                ipc_names.setdefault(ipc, inst.name)
            names.add(inst.name)
            if inst.port in ports and not inst.external:
                self.error(port_pos(node, pos), f"instance '{inst.name}': port {inst.port} is already used by instance '{ports[inst.port]}'")
            ports.setdefault(inst.port, inst.name)
            if router.enabled and inst.port == router.port:
                self.error(port_pos(node, pos), f"instance '{inst.name}': port {inst.port} is the router's port")
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
            self.error(pos_of(data, "run_dir", (0, 0)), f"run_dir '{clip(str(run_dir))}' is too long for a unix socket path; choose a shorter run_dir")

    def literal_secrets_warning(self, data: Any) -> None:
        """Keys written into a file that others can read are keys others have."""
        literal = [key for key, values in _secrets_as_written(data).items() if any(VAR_REFERENCE.sub("", v).strip() for v in values)]
        if not literal:
            return
        router = data["router"]
        try:
            mode = self.file.stat().st_mode & 0o777
        except OSError:
            return  # parsed from text, not a file
        if mode & 0o077:
            self.warn(
                key_pos(router, literal[0], (0, 0)),
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
            at = pos_of(node, "memory_gb", pos)
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
        at = pos_of(node, "kv_rebalance", pos_of(data, "sleep_manager", (0, 0)))
        if sm.kv_rebalance and sm.kv_budget_gb is None:
            self.error(at, "kv_rebalance: needs sleep_manager.kv_budget_gb (the KV limits of the awake kvcached instances together)")
        elif sm.kv_budget_gb is not None and sm.kv_min_gb > sm.kv_budget_gb:
            self.error(pos_of(node, "kv_min_gb", at), f"kv_min_gb: {sm.kv_min_gb:g} is more than kv_budget_gb {sm.kv_budget_gb:g}")
        for inst, pos, inode in placed:
            if inst.kv_limit_gb is not None and not kvcached.enabled(inst.env):
                self.warn(
                    pos_of(inode, "kv_limit_gb", pos),
                    f"instance '{inst.name}': kv_limit_gb is set but ENABLE_KVCACHED=true is not in its environment: no segment to limit",
                )


def _secrets_as_written(data: Any) -> dict[str, list[str]]:
    """router.api_keys' and router.admin_token's strings as the file writes them (${VAR} unexpanded)."""
    router = data.get("router") if isinstance(data, CommentedMap) else None
    if not isinstance(router, CommentedMap):
        return {}
    keys = router.get("api_keys")
    written = {"api_keys": keys if isinstance(keys, CommentedSeq) else [], "admin_token": [router.get("admin_token")]}
    return {key: [v for v in values if isinstance(v, str)] for key, values in written.items()}


def _secret_env(data: Any) -> tuple[str, ...]:
    """Names of the variables that router.api_keys and router.admin_token take from the environment."""
    names = (name for values in _secrets_as_written(data).values() for value in values for name in VAR_REFERENCE.findall(value))
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
