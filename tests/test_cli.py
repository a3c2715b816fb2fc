"""The `kvctl` command line as a user runs it: the real CLI as a subprocess, against real trees
(supervisord, router, sim engines) where the command talks to one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

KVCTL = [sys.executable, "-m", "kvctl"]


def kvctl(*args: str, columns: int = 200, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KVCTL_ADMIN_TOKEN"}
    env["COLUMNS"] = str(columns)
    return subprocess.run([*KVCTL, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- config warnings


def test_engine_flag_warnings_only_from_config_check(tmp_path: Path) -> None:
    config = tmp_path / "kvctl.yaml"
    # SGLang with sleep enabled but without --enable-memory-saver: a warning at the instance.
    config.write_text(f"router:\n  router_port: {free_port()}\nrun_dir: {tmp_path / 'run'}\n"
                      f"instances:\n  - name: s\n    model: org/s\n    engine: sglang\n    port: {free_port()}\n")
    check = kvctl("config", "check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert f"{config}:5:5: warning:" in check.stderr and "--enable-memory-saver" in check.stderr
    for command in (["status"], ["status", "--json"], ["stats"], ["events"], ["wake", "org/s"], ["sleep", "--all"], ["logs", "s"]):
        result = kvctl(*command, "-c", str(config))
        assert result.returncode != 0  # nothing runs: each fails in its own way...
        assert "enable-memory-saver" not in result.stderr, (command, result.stderr)  # ...but none repeats the warning


# --------------------------------------------------------------------------- version, help, completion


def test_version_help_and_shell_completion() -> None:
    from importlib.metadata import version

    result = kvctl("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kvctl {version('kvctl')}"
    assistance = kvctl("--help", columns=80)
    assert assistance.returncode == 0, assistance.stderr
    for option in ("--version", "--install-completion", "--show-completion", "--debug"):
        assert option in assistance.stdout
    for command in ("up", "down", "status", "sleep", "wake", "stats", "bench", "logs", "config"):
        assert f"│ {command} " in assistance.stdout, command
    # What the installed completion script runs on <TAB>: kvctl answers with the candidates.
    env = {**os.environ, "_KVCTL_COMPLETE": "complete_bash", "COMP_WORDS": "kvctl st", "COMP_CWORD": "1"}
    completed = subprocess.run(KVCTL, capture_output=True, text=True, env=env, timeout=30)
    assert completed.returncode == 0 and completed.stdout.split() == ["status", "stats"]
    env.update(COMP_WORDS="kvctl stats --wi", COMP_CWORD="2")
    assert subprocess.run(KVCTL, capture_output=True, text=True, env=env, timeout=30).stdout.split() == ["--window"]
    script = kvctl("--show-completion", "bash")
    assert script.returncode == 0 and "_KVCTL_COMPLETE=complete_bash" in script.stdout
