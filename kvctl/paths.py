"""Where a run's files live under RUN_DIR, and the router's program name.

Its own small module (standard library only) so that the CLI, the tree and the router can
name these paths without importing `kvctl.render` and its template engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROUTER = "router"  # the router's program name in supervisord and its log file's name


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @property
    def conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def env_dir(self) -> Path:
        return self.run_dir / "env"

    @property
    def router_state(self) -> Path:
        return self.run_dir / "router-state.json"

    @property
    def applied_config(self) -> Path:
        """A copy of the config file `kvctl up` applied last, to tell what changed since."""
        return self.run_dir / "applied-config.yaml"

    def log(self, program: str) -> Path:
        return self.logs / f"{program}.log"

    def env_file(self, program: str) -> Path:
        return self.env_dir / f"{program}.json"
