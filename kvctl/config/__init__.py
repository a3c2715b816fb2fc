"""kvctl.yaml: its schema (schema), the checks of its values (checks), reading the file within
limits (yaml_load), and reading the tree against the schema with FILE:LINE:COL problems (reader)."""

from kvctl.config.reader import load, parse
from kvctl.config.schema import (
    REFERENCE,
    Config,
    Instance,
    RouterConfig,
    SleepManagerConfig,
    SleepSettings,
    env_digest,
    kvcached_ipc_name,
    reference_tables,
)
from kvctl.config.yaml_load import resolve_path

__all__ = [
    "REFERENCE",
    "Config",
    "Instance",
    "RouterConfig",
    "SleepManagerConfig",
    "SleepSettings",
    "env_digest",
    "kvcached_ipc_name",
    "load",
    "parse",
    "reference_tables",
    "resolve_path",
]
