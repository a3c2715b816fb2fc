"""Config loading and validation through the real CLI: every problem as FILE:LINE:COL, exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvctl import config as config_mod

from conftest import ROOT

GOOD_INSTANCE = """\
  - name: a
    model: org/model-a
    engine: sim
    port: 12001
"""


def kvctl(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvctl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


# (id, file text, expected "LINE:COL", a fragment of the message)
BROKEN = [
    ("yaml-syntax", "router:\n  router_port: [8080\ninstances: []\n", "3:10", "YAML syntax error"),
    ("unknown-top-key", "instancs:\n" + GOOD_INSTANCE, "1:1", "did you mean 'instances'"),
    ("unknown-instance-key", "instances:\n" + GOOD_INSTANCE + "    engin_args: []\n", "6:5", "did you mean 'engine_args'"),
    ("unknown-router-key", "router:\n  router_prot: 9000\ninstances:\n" + GOOD_INSTANCE, "2:3", "did you mean 'router_port'"),
    ("wrong-type-port", "instances:\n  - model: m\n    engine: sim\n    port: eighty\n", "4:11", "expected an integer"),
    ("wrong-type-bool", "sleep_manager:\n  auto_sleep_enabled: yes please\ninstances:\n" + GOOD_INSTANCE, "2:23", "expected true or false"),
    ("missing-port", "instances:\n  - model: m\n    engine: sim\n", "2:5", "no port"),
    ("missing-model", "instances:\n  - engine: sim\n    port: 12001\n", "2:5", "missing required key 'model'"),
    ("unknown-engine", "instances:\n  - model: m\n    engine: vllmm\n    port: 12001\n", "3:13", "did you mean 'vllm'"),
    ("duplicate-name", "instances:\n" + GOOD_INSTANCE + GOOD_INSTANCE.replace("12001", "12002"), "6:5", "duplicate instance name 'a'"),
    ("duplicate-port", "instances:\n" + GOOD_INSTANCE + GOOD_INSTANCE.replace("name: a", "name: b"), "6:5", "port 12001 is already used"),
    ("router-port-clash", "router:\n  router_port: 12001\ninstances:\n" + GOOD_INSTANCE, "4:5", "is the router's port"),
    ("unsafe-name", "instances:\n  - name: 'bad name;rm'\n    model: m\n    engine: sim\n    port: 12001\n", "2:11", "not safe as a process name"),
    ("reserved-name", "instances:\n  - name: router\n    model: m\n    engine: sim\n    port: 12001\n", "2:11", "reserved"),
    ("unset-var", "instances:\n  - model: ${KVCTL_TEST_SURELY_UNSET}\n    engine: sim\n    port: 12001\n", "2:12", "KVCTL_TEST_SURELY_UNSET' is not set"),
    ("bad-venv", "instances:\n  - model: m\n    engine: vllm\n    using_venv: true\n    venv_path: ./no-such-venv\n    port: 12001\n", "5:16", "has no executable bin/python"),
    ("port-in-args-bad", "instances:\n  - model: m\n    engine: sim\n    engine_args: ['--port=http']\n", "4:18", "is not a port number"),
    ("port-out-of-range", "instances:\n  - model: m\n    engine: sim\n    port: 70000\n", "4:11", "between 1 and 65535"),
    ("env-not-key-value", "instances:\n  - model: m\n    engine: sim\n    port: 12001\n    engine_env: ['NOEQUALS']\n", "5:18", "expected 'KEY=VALUE'"),
    ("non-loopback-no-keys", "router:\n  router_host: 0.0.0.0\ninstances:\n" + GOOD_INSTANCE, "1:1", "non-loopback"),
    ("duplicate-yaml-key", "instances:\n" + GOOD_INSTANCE + "    port: 12002\n", "6:5", "duplicate key"),
    ("empty-file", "", "1:1", "empty"),
    ("instances-not-list", "instances: 3\n", "1:12", "must be a list"),
]


@pytest.mark.parametrize("name, text, where, fragment", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_config_is_one_line_with_position_and_exit_2(tmp_path: Path, name: str, text: str, where: str, fragment: str) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(text)
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if f"{path}:" in line and "warning:" not in line]
    assert lines, result.stderr
    assert any(line.startswith(f"{path}:{where}: ") and fragment in line for line in lines), result.stderr
    assert not (tmp_path / ".kvctl").exists(), "a failed check must change nothing"


def test_every_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("routr: {}\ninstances:\n  - model: m\n    engine: nope\n    port: 12001\n  - model: n\n    engine: sim\n")
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:1:1", f"{path}:4:13", f"{path}:6:5"]


def test_up_refuses_a_broken_config_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("instances:\n  - model: m\n    engine: sim\n")
    result = kvctl("up", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:2:5: ")
    assert not (tmp_path / ".kvctl").exists()


def test_kvcached_example_passes_check_in_the_kvcached_layout(tmp_path: Path) -> None:
    """The prototype's example-config.yaml, byte for byte, where it lives in the kvcached repo."""
    controller = tmp_path / "controller"
    controller.mkdir()
    shutil.copy(ROOT / "examples" / "kvcached.yaml", controller / "example-config.yaml")
    venv_bin = tmp_path / "engine_integration" / "vllm-v0.9.2" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    result = kvctl("config", "check", "-c", "example-config.yaml", cwd=controller)
    assert result.returncode == 0, result.stderr
    assert "2 instances, 2 models" in result.stdout
    config = config_mod.load(controller / "example-config.yaml")
    first = config.instances[0]
    assert (first.name, first.model, first.engine, first.host, first.port) == ("instance1", "meta-llama/Llama-3.2-1B", "vllm", "localhost", 12346)
    assert first.python == str(venv_bin / "python")
    assert first.args == ("--disable-log-requests", "--no-enable-prefix-caching", "--host=localhost", "--port=12346", "--gpu-memory-utilization", "0.5", "--enable-sleep-mode")
    assert first.env["KVCACHED_GPU_UTILIZATION"] == "0.95" and first.env["ENABLE_KVCACHED"] == "true"
    assert first.env["VLLM_SERVER_DEV_MODE"] == "1"
    # The prototype gave both instances the same IPC name; kvctl makes them unique and says so.
    assert config.instances[0].env["KVCACHED_IPC_NAME"] != config.instances[1].env["KVCACHED_IPC_NAME"]
    assert "KVCACHED_IPC_NAME=VLLM replaced" in result.stderr
    assert config.router.host == "localhost" and config.router.port == 8080
    assert config.sleep_manager.min_sleep_duration == 80


def test_config_path_from_environment_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "kvctl.yaml").write_text("run_dir: state\ninstances:\n" + GOOD_INSTANCE)
    env = {**os.environ, "KVCTL_CONFIG": str(sub / "kvctl.yaml")}
    result = kvctl("config", "render", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"file={sub / 'state' / 'supervisor.sock'}" in result.stdout


def test_sleep_warnings_do_not_fail_the_check(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(
        "instances:\n  - model: m\n    engine: vllm\n    port: 12001\n"
        "  - model: n\n    engine: sglang\n    port: 12002\n"
    )
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "VLLM_SERVER_DEV_MODE=1" in result.stderr and "--enable-sleep-mode" in result.stderr
    assert "--enable-memory-saver" in result.stderr


def test_kvcached_block_env_lists_and_mappings(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(
        "kvcached:\n  kvcached_gpu_utilization: 0.9\n"
        "instances:\n  - model: m\n    engine: sim\n    port: 12001\n"
        "    kvcached_env: {ENABLE_KVCACHED: true}\n    engine_env: ['A=1', 'B=x=y']\n"
        "    engine_args: '--max-model-len 256 --host 127.0.0.2'\n"
    )
    inst = config_mod.load(path).instances[0]
    assert inst.env["KVCACHED_GPU_UTILIZATION"] == "0.9"
    assert inst.env["ENABLE_KVCACHED"] == "true" and inst.env["B"] == "x=y"
    assert inst.host == "127.0.0.2" and inst.args == ("--max-model-len", "256", "--host", "127.0.0.2")
