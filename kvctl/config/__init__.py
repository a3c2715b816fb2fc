"""kvctl.yaml: its schema, reading it, and checking it (see the modules of this package)."""

from kvctl.config.schema import (
    REFERENCE,
    Config,
    Instance,
    RouterConfig,
    SimSettings,
    SleepManagerConfig,
    SleepSettings,
    env_digest,
    is_loopback,
    kvcached_ipc_name,
    load,
    parse,
    reference_tables,
    resolve_path,
)

__all__ = [
    "REFERENCE",
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
    "reference_tables",
    "resolve_path",
]
