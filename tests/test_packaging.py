"""The wheel carries the supervisord template, so a plain (non-editable) install works."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT, kvctl


def test_wheel_ships_the_template_and_renders_from_it(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("kvctl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "kvctl/templates/supervisord.conf.j2" in names
        assert any(name.endswith("entry_points.txt") and b"kvctl = kvctl.cli:main" in archive.read(name) for name in names)
        archive.extractall(tmp_path / "site")

    # Import kvctl from the unpacked wheel only (not the checkout) and render a config.
    (tmp_path / "kvctl.yaml").write_text("instances:\n  - model: m\n    engine: sim\n    port: 12001\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [sys.executable, "-c", "import kvctl, sys; print(kvctl.__file__); sys.argv=['kvctl','config','render']; from kvctl.cli import main; main()"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "site"))
    assert "[program:m]" in result.stdout and "[program:router]" in result.stdout


def test_python_dash_m_kvctl_runs_the_cli() -> None:
    result = kvctl("--help", timeout=60)  # helpers.kvctl runs `python -m kvctl`
    assert result.returncode == 0
    for command in ("up", "down", "status", "logs", "sleep", "wake", "config", "router"):
        assert command in result.stdout
