"""What changed between two configs, in words (SPEC §14): `kvctl up` prints it and the
router logs it when it reloads. Secrets are named, never shown."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Any

from kvctl.config import Config, Instance

_SECRET_FIELDS = frozenset({"api_keys", "admin_token", "env"})
# Router settings that a reload cannot apply: the listening socket is the process's.
RESTART_FIELDS = frozenset({"host", "port", "enabled"})


def file_digest(path: Path) -> str:
    """What identifies a config file's content (the router reports the one it runs)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _field_changes(section: str, old: Any, new: Any) -> list[str]:
    lines = []
    for f in fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name in _SECRET_FIELDS:
            lines.append(f"{section}: {f.name} changed")
        else:
            lines.append(f"{section}: {f.name} changed ({_show(before)} -> {_show(after)})")
    return lines


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def instance_change(old: Instance, new: Instance) -> str:
    """Which settings of an instance changed, e.g. `engine_args, sleep`."""
    names = [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    return ", ".join("engine_args" if name == "args" else name for name in names)


def changes(old: Config, new: Config, restarted: frozenset[str] = frozenset()) -> list[str]:
    """One line per change: router and sleep_manager settings, instances added/removed/changed
    (`restarted` names the programs supervisord restarted for it)."""
    lines = _field_changes("router", old.router, new.router) + _field_changes("sleep_manager", old.sleep_manager, new.sleep_manager)
    if old.launch_delay_seconds != new.launch_delay_seconds:
        lines.append(f"launch_delay_seconds changed ({old.launch_delay_seconds:g} -> {new.launch_delay_seconds:g})")
    before = {inst.name: inst for inst in old.instances}
    after = {inst.name: inst for inst in new.instances}
    for name, inst in after.items():
        if name not in before:
            lines.append(f"instance {name}: added")
        elif before[name] != inst:
            what = "restarted" if name in restarted else "updated"
            lines.append(f"instance {name}: {what} ({instance_change(before[name], inst)} changed)")
    lines += [f"instance {name}: removed" for name in before if name not in after]
    return lines


def needs_router_restart(old: Config, new: Config) -> bool:
    return any(getattr(old.router, name) != getattr(new.router, name) for name in RESTART_FIELDS)
