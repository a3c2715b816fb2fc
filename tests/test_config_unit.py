"""`kvctl.config.load` in process: which file it reads, what relative paths mean, and the
one-line FILE:LINE:COL errors the CLI prints (tests/test_config.py runs the CLI itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvctl.config import load
from kvctl.errors import ConfigError

INSTANCE = "instances:\n  - model: org/m\n    engine: sim\n    port: 12001\n"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def test_the_file_is_the_flag_then_kvctl_config_then_kvctl_yaml_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("here", "env", "flag"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kvctl.yaml").write_text(f"router:\n  router_port: {len(name) + 9000}\n" + INSTANCE)
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.delenv("KVCTL_CONFIG", raising=False)
    assert load().path == tmp_path / "here" / "kvctl.yaml"
    monkeypatch.setenv("KVCTL_CONFIG", str(tmp_path / "env" / "kvctl.yaml"))
    assert load().router.port == 9003
    assert load(tmp_path / "flag" / "kvctl.yaml").router.port == 9004


def test_relative_paths_are_relative_to_the_file_not_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    default, chosen = tmp_path / "conf" / "default.yaml", tmp_path / "conf" / "chosen.yaml"
    default.write_text(INSTANCE)
    chosen.write_text("run_dir: state/here\n" + INSTANCE)
    monkeypatch.chdir(tmp_path)
    assert load("conf/default.yaml").run_dir == tmp_path / "conf" / ".kvctl"
    assert load("conf/chosen.yaml").run_dir == tmp_path / "conf" / "state" / "here"


def test_a_missing_or_unreadable_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing) == [f"{missing}: no such config file (use -c PATH or set KVCTL_CONFIG)"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("instances:\n  - model: caf\xe9\n".encode("latin-1"))
    [problem] = problems_of(latin1)
    assert problem.startswith(f"{latin1}: cannot read config file: ") and "\n" not in problem


def test_errors_carry_the_path_of_the_file_and_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(INSTANCE + "    engin_args: []\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5:5: unknown key 'engin_args'") and problem.endswith("(did you mean 'engine_args'?)")
    path.write_text("router:\n  router_port: [8080\n" + INSTANCE)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:") and "YAML syntax error" in problem


def test_every_problem_of_a_file_is_reported_at_once_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("router:\n  router_port: eighty\ninstances:\n  - model: org/m\n    engine: sim\n    port: 70000\n")
    found = problems_of(path)
    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:2:16", f"{path}:6:11"], found
