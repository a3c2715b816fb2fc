"""Config -> RUN_DIR/supervisord.conf (through templates/), plus each program's env file.

supervisord's ini format mangles some values (``%`` interpolation, `` ;`` comments, the
quote handling of ``environment=``). So environment values never go into the file:
each program's environment is written to ``RUN_DIR/env/NAME.json`` (0600) and applied
at exec by ``python -m kvctl.launch``; the file only carries a digest of it, so that a
changed value still restarts the program. Commands are rendered from argument lists
and the result is parsed back with supervisor's own parser to prove it round-trips.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from kvctl.config import Config, env_digest
from kvctl.engines import adapter_for
from kvctl.errors import ConfigError
from kvctl.files import write_private
from kvctl.launch import GAVE_UP_EXIT, LaunchSpec
from kvctl.paths import ROUTER, RunPaths
from kvctl.reaper import marker

ROUTER_STOPWAIT_SECONDS = 60
ENGINE_STOPWAIT_SECONDS = 30
# supervisord closes fds up to `minfds` in every child it spawns: a higher value costs each start.
MAX_MINFDS = 65536


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]  # what runs, after the launcher applied the env file
    env: dict[str, str]
    stopwaitsecs: int
    priority: int
    marker: str  # KVCTL_INSTANCE, inherited by the whole process tree (kvctl.reaper)
    launch: LaunchSpec | None = None  # engines: what kvctl.launch reads from the env file
    autostart: bool = False  # `kvctl up` starts programs itself, in order, with the launch delay

    @property
    def env_digest(self) -> str:
        return env_digest(self.env)


def programs(config: Config) -> list[Program]:
    """The programs supervisord runs: each launched instance, then the router."""
    paths = RunPaths(config.run_dir)
    out = []
    for inst in config.launched:
        launch = LaunchSpec(
            run_dir=str(config.run_dir),
            name=inst.name,
            env=dict(inst.env),
            unset=tuple(config.secret_env),
            health_url=inst.url + adapter_for(inst).health_path,
            startup_timeout_seconds=inst.startup_timeout_seconds,
            startretries=inst.startretries,
            log=str(paths.log(inst.name)),
        )
        out.append(
            Program(
                name=inst.name,
                argv=_launcher(paths.env_file(inst.name)) + adapter_for(inst).command(inst),
                env=dict(inst.env),
                stopwaitsecs=ENGINE_STOPWAIT_SECONDS,
                # Not the position in the file: adding or removing another instance must not
                # change this section, or supervisord restarts the engine.
                priority=100,
                marker=marker(config.run_dir, inst.name),
                launch=launch,
            )
        )
    if config.router.enabled:
        out.append(
            Program(
                name=ROUTER,
                argv=[sys.executable, "-m", "kvctl", "router", "-c", str(config.path)],
                # Everything else reloads in place (SIGHUP); a new listen address needs a restart,
                # which a changed digest makes supervisord do.
                env={"KVCTL_ROUTER_LISTEN": f"{config.router.host}:{config.router.port}"},
                stopwaitsecs=ROUTER_STOPWAIT_SECONDS,
                priority=10,
                marker=marker(config.run_dir, ROUTER),
            )
        )
    return out


def _launcher(env_file: Path) -> list[str]:
    return [sys.executable, "-m", "kvctl.launch", str(env_file), "--"]


def _sv(value: object) -> str:
    """Escape a value for supervisor's ini format, which %-interpolates every value."""
    return str(value).replace("%", "%%")


def _command(argv: list[str]) -> str:
    return _sv(shlex.join(argv))


def _template_dir() -> Path:
    # Inside an installed wheel the templates sit in the package; in a checkout, beside it.
    packaged = Path(__file__).resolve().parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "templates"


def render_text(config: Config) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_template_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sv"] = _sv
    env.filters["command"] = _command
    paths = RunPaths(config.run_dir)
    progs = programs(config)
    text = env.get_template("supervisord.conf.j2").render(
        config_path=config.path,
        conf_path=paths.conf,
        socket=paths.socket,
        pidfile=paths.pidfile,
        logs_dir=paths.logs,
        base_dir=config.base_dir,
        programs=progs,
        minfds=_minfds(),
        gave_up_exit=GAVE_UP_EXIT,
    )
    _verify(text, progs, config)
    return text


def _minfds() -> int:
    """supervisord raises its soft fd limit to this; above the hard limit it would not start."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return MAX_MINFDS if hard == resource.RLIM_INFINITY else min(hard, MAX_MINFDS)


def _verify(text: str, progs: list[Program], config: Config) -> None:
    """Read the rendered text back the way supervisord does; every argv must survive exactly."""
    from supervisor.options import UnhosedConfigParser

    parser = UnhosedConfigParser()
    expansions = {"here": str(config.base_dir), "host_node_name": platform.node()}
    expansions.update({f"ENV_{k}": v for k, v in os.environ.items()})
    bad = []
    try:
        parser.read_string(text)
        for program in progs:
            section = f"program:{program.name}"
            command = parser.saneget(section, "command", expansions={**expansions, "program_name": program.name, "group_name": program.name})
            if shlex.split(command) != program.argv:
                bad.append(program.name)
    except ValueError as exc:
        raise ConfigError([f"{config.path}: the rendered supervisord.conf is invalid: {exc}"]) from None
    if bad:
        raise ConfigError(
            [f"{config.path}: instance '{name}': its command cannot be written to supervisord.conf exactly (an argument holding ' ;' or ' #'?)" for name in bad]
        )


def write(config: Config) -> Path:
    """Create RUN_DIR (0700) and write supervisord.conf (0600) and the env files (0600)."""
    paths = RunPaths(config.run_dir)
    text = render_text(config)
    for directory in (paths.run_dir, paths.logs, paths.env_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    for program in programs(config):
        if program.launch is not None:
            write_private(paths.env_file(program.name), program.launch.to_json())
    write_private(paths.conf, text)
    return paths.conf
