"""Config loading and validation through the real CLI: every problem as FILE:LINE:COL, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

from kvctl import config as config_mod
from kvctl.engines import adapter_for
from kvctl.errors import ConfigError
from kvctl.sim.settings import SimSettings

from helpers import ROOT, kvctl

GOOD_INSTANCE = """\
  - name: a
    model: org/model-a
    engine: sim
    port: 12001
"""


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
    ("duplicate-port", "instances:\n" + GOOD_INSTANCE + GOOD_INSTANCE.replace("name: a", "name: b"), "9:5", "port 12001 is already used"),
    ("router-port-clash", "router:\n  router_port: 12001\ninstances:\n" + GOOD_INSTANCE, "7:5", "is the router's port"),
    ("unsafe-name", "instances:\n  - name: 'bad name;rm'\n    model: m\n    engine: sim\n    port: 12001\n", "2:11", "not safe as a process name"),
    ("reserved-name", "instances:\n  - name: router\n    model: m\n    engine: sim\n    port: 12001\n", "2:11", "reserved"),
    ("unset-var", "instances:\n  - model: ${KVCTL_TEST_SURELY_UNSET}\n    engine: sim\n    port: 12001\n", "2:12", "KVCTL_TEST_SURELY_UNSET' is not set"),
    (
        "bad-venv",
        "instances:\n  - model: m\n    engine: vllm\n    using_venv: true\n    venv_path: ./no-such-venv\n    port: 12001\n",
        "5:16",
        "has no executable bin/python",
    ),
    ("port-in-args-bad", "instances:\n  - model: m\n    engine: sim\n    engine_args: ['--port=http']\n", "4:18", "is not a port number"),
    ("port-out-of-range", "instances:\n  - model: m\n    engine: sim\n    port: 70000\n", "4:11", "between 1 and 65535"),
    ("env-not-key-value", "instances:\n  - model: m\n    engine: sim\n    port: 12001\n    engine_env: ['NOEQUALS']\n", "5:18", "expected 'KEY=VALUE'"),
    ("non-loopback-no-keys", "router:\n  router_host: 0.0.0.0\ninstances:\n" + GOOD_INSTANCE, "2:3", "non-loopback"),
    ("duplicate-yaml-key", "instances:\n" + GOOD_INSTANCE + "    port: 12002\n", "6:5", "duplicate key"),
    ("empty-file", "", "1:1", "empty"),
    ("instances-not-list", "instances: 3\n", "1:12", "must be a list"),
    ("top-level-scalar", "5\n", "1:1", "the top level must be a mapping, got an integer"),
    ("port-in-args-out-of-range", "instances:\n  - model: m\n    engine: sim\n    engine_args: ['--port=70000']\n", "4:18", "is not a port number"),
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
    assert first.args == (
        "--disable-log-requests",
        "--no-enable-prefix-caching",
        "--host=localhost",
        "--port=12346",
        "--gpu-memory-utilization",
        "0.5",
        "--enable-sleep-mode",
    )
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
    env = {"KVCTL_CONFIG": str(sub / "kvctl.yaml")}
    result = kvctl("config", "render", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"file={sub / 'state' / 'supervisor.sock'}" in result.stdout


def test_sleep_warnings_do_not_fail_the_check(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text("instances:\n  - model: m\n    engine: vllm\n    port: 12001\n  - model: n\n    engine: sglang\n    port: 12002\n")
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


# --------------------------------------------------------------------------- in-process checks

FILE = Path("/kvctl-test/kvctl.yaml")  # parse() reads no file: a path for the messages only


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.parse(text, FILE)
    return info.value.problems


def only_problem(text: str) -> tuple[str, str]:
    """The single problem of `text` as ("LINE:COL", message)."""
    found = problems(text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{FILE}:"), found
    where, message = found[0][len(f"{FILE}:") :].split(": ", 1)
    return where, message


def test_new_router_and_instance_keys_have_their_defaults() -> None:
    config = config_mod.parse("instances:\n" + GOOD_INSTANCE, FILE)
    router, inst = config.router, config.instances[0]
    assert (router.log_level, router.log_format, router.access_log) == ("info", "text", True)
    assert (router.max_header_bytes, router.max_connections) == (65536, 10000)
    assert (router.header_timeout_seconds, router.body_timeout_seconds, router.keepalive_timeout_seconds) == (10.0, 30.0, 5.0)
    assert inst.startretries == 3 and inst.sim.spawn_children == 0 and inst.sim.memory_gb is None
    assert config.secret_env == ()


def test_new_keys_are_read() -> None:
    config = config_mod.parse(
        "router:\n  log_level: debug\n  log_format: json\n  access_log: false\n  max_header_bytes: 8192\n"
        "  header_timeout_seconds: 2.5\n  body_timeout_seconds: 4\n  keepalive_timeout_seconds: 1\n  max_connections: 50\n"
        "instances:\n" + GOOD_INSTANCE + "    startretries: 0\n    sim: {spawn_children: 2, memory_gb: 3.5}\n",
        FILE,
    )
    router, inst = config.router, config.instances[0]
    assert (router.log_level, router.log_format, router.access_log) == ("debug", "json", False)
    assert (router.max_header_bytes, router.max_connections) == (8192, 50)
    assert (router.header_timeout_seconds, router.body_timeout_seconds, router.keepalive_timeout_seconds) == (2.5, 4.0, 1.0)
    assert inst.startretries == 0 and inst.sim.spawn_children == 2 and inst.sim.memory_gb == 3.5


NEW_KEYS_BROKEN = [
    ("router:\n  log_level: loud\n", "2:14", "must be one of debug, info, warning, error"),
    ("router:\n  log_format: xml\n", "2:15", "must be one of text, json"),
    ("router:\n  access_log: 1\n", "2:15", "expected true or false"),
    ("router:\n  max_header_bytes: 10\n", "2:21", "at least 1024"),
    ("router:\n  header_timeout_seconds: 0\n", "2:27", "greater than 0"),
    ("router:\n  body_timeout_seconds: soon\n", "2:25", "expected a number"),
    ("router:\n  keepalive_timeout_seconds: -1\n", "2:30", "greater than 0"),
    ("router:\n  max_connections: 0\n", "2:20", "at least 1"),
    ("instances:\n" + GOOD_INSTANCE + "    startretries: -1\n", "6:19", "at least 0"),
    ("instances:\n" + GOOD_INSTANCE + "    sim: {spawn_children: 1.5}\n", "6:27", "expected an integer"),
    ("instances:\n" + GOOD_INSTANCE + "    sim: {memory_gb: 0}\n", "6:22", "greater than 0"),
]


@pytest.mark.parametrize("text, where, fragment", NEW_KEYS_BROKEN)
def test_new_keys_are_validated(text: str, where: str, fragment: str) -> None:
    if "instances:" not in text:
        text += "instances:\n" + GOOD_INSTANCE
    found_where, message = only_problem(text)
    assert (found_where, fragment in message) == (where, True), message


def _sim_flags() -> list[argparse.Action]:
    """Every option of `python -m kvctl.sim` that the `sim:` block should carry."""
    from kvctl.sim.__main__ import _parser

    return [a for a in _parser()._actions if a.option_strings and a.dest not in {"help", "model", "host", "port"}]


def test_sim_block_accepts_every_sim_flag_and_the_adapter_passes_it() -> None:
    from kvctl.sim.__main__ import _parser

    lines, expected = [], {}
    for action in _sim_flags():
        if action.const is True:  # store_true
            value: object = True
        elif action.choices:
            value = list(action.choices)[-1]
        else:
            value = action.type("1")  # an int or a float, as the flag's check reads it
        lines.append(f"      {action.dest}: {str(value).lower() if value is True else value}\n")
        expected[action.dest] = value
    inst = config_mod.parse("instances:\n" + GOOD_INSTANCE + "    sim:\n" + "".join(lines), FILE).instances[0]
    argv = adapter_for(inst).command(inst)
    assert argv[1:3] == ["-m", "kvctl.sim"]
    parsed, unknown = _parser().parse_known_args(argv[3:])
    assert unknown == []
    assert {dest: getattr(parsed, dest) for dest in expected} == expected


def test_sim_spawn_children_only_when_set_and_memory_gb_from_sim_or_instance() -> None:
    def argv(extra: str) -> list[str]:
        inst = config_mod.parse("instances:\n" + GOOD_INSTANCE + extra, FILE).instances[0]
        return adapter_for(inst).command(inst)

    plain = argv("")
    assert "--spawn-children" not in plain and "--memory-gb" not in plain
    assert "--spawn-children" not in argv("    sim: {spawn_children: 0}\n")
    spawning = argv("    sim: {spawn_children: 2}\n")
    assert spawning[spawning.index("--spawn-children") + 1] == "2"
    from_instance = argv("    memory_gb: 7\n")
    assert from_instance[from_instance.index("--memory-gb") + 1] == "7.0"
    from_sim = argv("    memory_gb: 7\n    sim: {memory_gb: 2}\n")
    assert from_sim[from_sim.index("--memory-gb") + 1] == "2.0"


def test_secret_env_names_the_variables_of_api_keys_and_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVCTL_T_KEY1", "KVCTL_T_KEY2", "KVCTL_T_ADMIN", "KVCTL_T_MODEL"):
        monkeypatch.setenv(name, "s3cret-" + name.lower())
    config = config_mod.parse(
        "router:\n  api_keys: ['${KVCTL_T_KEY1}', 'literal-key', 'x-${KVCTL_T_KEY2}']\n  admin_token: ${KVCTL_T_ADMIN}\n"
        "instances:\n  - model: ${KVCTL_T_MODEL}\n    engine: sim\n    port: 12001\n",
        FILE,
    )
    assert config.secret_env == ("KVCTL_T_KEY1", "KVCTL_T_KEY2", "KVCTL_T_ADMIN")
    assert config.router.api_keys == ("s3cret-kvctl_t_key1", "literal-key", "x-s3cret-kvctl_t_key2")


def test_kvcached_ipc_name_survives_kvcached_sanitising_and_is_unique() -> None:
    config = config_mod.parse(
        "instances:\n  - name: llama-3.2-1b\n    model: m\n    engine: sim\n    port: 12001\n"
        "  - name: " + "x" * 64 + "\n    model: n\n    engine: sim\n    port: 12002\n",
        FILE,
    )
    short, long = config.instances
    assert short.env["KVCACHED_IPC_NAME"] == config_mod.kvcached_ipc_name(short.name) == "kvctl_llama-3-2-1b"
    assert long.env["KVCACHED_IPC_NAME"] == "kvctl_" + "x" * 58
    for inst in config.instances:
        name = inst.env["KVCACHED_IPC_NAME"]
        # kvcached keeps letters, digits, '_' and '-' and cuts at 64: it must change nothing.
        assert re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64] == name


def _two(first: str, second: str) -> str:
    return f"instances:\n  - {first}\n    engine: sim\n    port: 12001\n  - engine: sim\n    port: 12002\n    {second}\n"


@pytest.mark.parametrize(
    "text, where",
    [
        (_two("name: a.b\n    model: m", "name: a-b\n    model: n"), "8:5"),  # differ only in a character kvcached replaces
        (_two("name: " + "y" * 60 + "1\n    model: m", "name: " + "y" * 60 + "2\n    model: n"), "8:5"),  # differ beyond 64 characters
        (_two("name: m.1\n    model: m", "model: org/m-1"), "8:5"),  # a name derived from the model collides too
    ],
)
def test_colliding_kvcached_ipc_names_are_an_error_at_the_second_name(text: str, where: str) -> None:
    found_where, message = only_problem(text)
    assert found_where == where and "kvcached IPC name" in message, message


def _budget(budget: float, *instances: str) -> str:
    text = f"sleep_manager:\n  memory_budget_gb: {budget}\ninstances:\n"
    for index, extra in enumerate(instances):
        text += f"  - name: i{index}\n    model: m{index}\n    engine: sim\n    port: {12001 + index}\n    {extra}\n"
    return text


def test_an_instance_larger_than_the_memory_budget_is_refused_at_its_memory_gb() -> None:
    where, message = only_problem(_budget(20, "memory_gb: 10", "memory_gb: 30"))
    assert where == "13:5" and "memory_gb 30 exceeds sleep_manager.memory_budget_gb 20" in message
    config_mod.parse(_budget(20, "memory_gb: 20", "memory_gb: 20"), FILE)  # each fits alone: fine


def test_pinned_instances_over_the_budget_together_are_refused_at_the_one_that_tips_it() -> None:
    pinned = "sleep: {enabled: false}\n    memory_gb: 8"
    where, message = only_problem(_budget(20, pinned, "memory_gb: 15", pinned, pinned))
    # 8 + 8 fit; the third pinned one (line 26) makes 24 > 20; the sleeping one (15) does not count.
    assert where == "26:5" and "need 24 GB together" in message, message
    config_mod.parse(_budget(20, pinned, "memory_gb: 15", pinned), FILE)
    config_mod.parse(_budget(20, "memory_gb: 15", "memory_gb: 15"), FILE)  # sleepers take turns


def test_impossible_budget_through_the_cli_exits_2_with_file_line_col(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(_budget(20, "memory_gb: 30"))
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"{path}:8:5: instance 'i0': memory_gb 30 exceeds sleep_manager.memory_budget_gb 20: it could never be awake"]


LOCATED = [
    # (id, text, "LINE:COL", the message exactly or its start)
    ("type-error-names-the-key", "router:\n  router_port: '8080'\ninstances:\n" + GOOD_INSTANCE, "2:16", "router_port: expected an integer, got a string"),
    ("nested-type-error-names-the-key", "instances:\n" + GOOD_INSTANCE + "    sleep: {level: 3}\n", "6:20", "level: must be one of 1, 2, got 3"),
    ("list-item-type-error-names-the-key", "router:\n  api_keys: [1]\ninstances:\n" + GOOD_INSTANCE, "2:14", "api_keys: expected a string, got an integer"),
    ("section-not-a-mapping", "router: 8080\ninstances:\n" + GOOD_INSTANCE, "1:9", "router: expected a mapping, got an integer"),
    (
        "duplicate-port-in-engine-args",
        "instances:\n" + GOOD_INSTANCE + "  - model: b\n    engine: sim\n    engine_args: ['--max-model-len 8', '--port 12001']\n",
        "8:40",
        "instance 'b': port 12001 is already used by instance 'a'",
    ),
    (
        "router-port-in-engine-args-string",
        "router:\n  router_port: 12001\ninstances:\n  - model: b\n    engine: sim\n    engine_args: --port=12001\n",
        "6:18",
        "instance 'b': port 12001 is the router's port",
    ),
    (
        "indent-deeper",
        "router:\n  router_port: 8080\n   router_host: x\ninstances:\n" + GOOD_INSTANCE,
        "3:4",
        "bad indentation: 'router_host' (column 4) is not aligned with 'router_port' (column 3) on line 2",
    ),
    (
        "indent-shallower",
        "router:\n  router_port: 8080\n router_host: x\ninstances:\n" + GOOD_INSTANCE,
        "3:2",
        "bad indentation: 'router_host' (column 2) is not aligned with 'router_port' (column 3) on line 2",
    ),
    (
        "indent-in-list-item",
        "instances:\n  - model: m\n    engine: sim\n      port: 1\n",
        "4:7",
        "bad indentation: 'port' (column 7) is not aligned with 'engine' (column 5) on line 3",
    ),
    (
        "indent-at-list-dash",
        "instances:\n  - model: m\n    engine: sim\n  port: 1\n",
        "4:3",
        "bad indentation: 'port' (column 3) is not aligned with 'engine' (column 5) on line 3",
    ),
    ("colon-in-value", "instances:\n  - model: a: b\n", "2:13", "YAML syntax error: ': ' inside a value (quote the value)"),
    ("missing-colon", "router:\n  router_port: 1\n  oops\ninstances: []\n", "3:3", "YAML syntax error: a line in a mapping without 'key: value'"),
    ("tab", "instances:\n\t- model: m\n", "2:1", "YAML syntax error: a tab character; YAML indents with spaces only"),
]


@pytest.mark.parametrize("text, where, message", [case[1:] for case in LOCATED], ids=[case[0] for case in LOCATED])
def test_errors_point_at_the_offending_key_and_say_what_is_wrong(text: str, where: str, message: str) -> None:
    found_where, found = only_problem(text)
    assert found_where == where and found.startswith(message), found


# --------------------------------------------------------------------------- hostile files


def _laughs(levels: int, indent: str = "") -> str:
    """The 'billion laughs': each level an anchored list of nine aliases of the one before."""
    text = f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for level in range(1, levels):
        text += f"{indent}l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]\n"
    return text


HOSTILE = [
    # (id, text, "LINE:COL" or "" for the whole file, a fragment of the one message)
    ("billion-laughs", _laughs(9) + "instances:\n" + GOOD_INSTANCE, "6:5", "expands to more than 100000 values"),
    ("billion-laughs-in-kvcached", "kvcached:\n" + _laughs(9, "  ") + "instances:\n" + GOOD_INSTANCE, "7:7", "expands to more than 100000 values"),
    ("alias-of-a-list-as-key", _laughs(9).replace("l8:", "#") + "kvcached: {*l4 : 1}\n", "6:5", "expands to more than"),
    ("alias-as-key", "kvcached:\n  a: &i [1]\n  *i : 1\ninstances:\n" + GOOD_INSTANCE, "3:3", "a mapping key must be a plain value"),
    ("undefined-alias-as-key", "kvcached: {*i: 1}\ninstances:\n" + GOOD_INSTANCE, "1:12", "a mapping key must be a plain value"),
    ("deep-nesting-one-line", "kvcached: " + "[" * 100_000 + "]" * 100_000 + "\n", "1:16385", "longer than 16384 characters"),
    ("deep-nesting-lines", "kvcached: " + "[\n" * 100_000 + "]\n" * 100_000, "32:1", "nested deeper than 32 levels"),
    ("deep-block-mappings", "".join(" " * i + f"k{i}:\n" for i in range(200)), "33:33", "nested deeper than 32 levels"),
    ("comment-line-1MB", "instances:\n  - model: m  # " + "x" * 1_000_000 + "\n", "2:16385", "longer than 16384 characters"),
    ("comment-line-2MB", "instances:\n  - model: m  # " + "x" * 2_000_000 + "\n", "", "larger than 1024 KiB"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text, where, fragment", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_files_are_one_line_errors(text: str, where: str, fragment: str) -> None:
    found = problems(text)
    assert len(found) == 1 and "\n" not in found[0], found
    assert found[0].startswith(f"{FILE}:{where}: " if where else f"{FILE}: ") and fragment in found[0], found[0][:300]


@pytest.mark.timeout(10)
def test_an_alias_bomb_where_a_value_is_expected_is_named_not_expanded() -> None:
    """7,381 values behind one alias (under the cap) used where kvctl wants a string, list or mapping."""
    text = "kvcached:\n" + _laughs(4, "  ").replace("  l", "  x_l") + "instances:\n" + GOOD_INSTANCE.replace("name: a", "name: *l3")
    text += "    engine_env: *l3\n    engine_args: [*l3]\n    aliases: *l3\n"
    found = problems(text)
    assert len(found) < 40 and all(len(line) < 200 for line in found), found
    assert any("name: expected a string, got a list" in line for line in found), found
    assert any("engine_env: expected 'KEY=VALUE', got a list" in line for line in found), found


def test_messages_quote_only_a_short_prefix_of_a_long_value() -> None:
    long = "v" * 10_000
    text = (
        f"router:\n  router_host: {long}\n  log_level: {long}\ninstances:\n  - name: {long}\n    model: m\n    engine: {long}\n"
        f"    port: {long}\n    engine_env: ['{long}']\n    {long[:1000]}: 1\n"
    )
    found = problems(text)
    assert len(found) == 6, found
    assert all(len(line) < 250 for line in found), [line[:300] for line in found]
    assert not any("v" * 61 in line for line in found), found
    assert sum(("v" * 60 + "…") in line for line in found) == 5, found  # all but the port's


def test_a_50_MB_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    with path.open("wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert info.value.problems == [f"{path}: the config file is larger than 1024 KiB (a kvctl.yaml needs a few KiB)"]
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 2 and result.stderr.splitlines() == info.value.problems, result.stderr


def test_billion_laughs_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "kvctl.yaml"
    path.write_text(_laughs(9) + "instances:\n" + GOOD_INSTANCE)
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"{path}:6:5: this expands to more than 100000 values (each use of a YAML alias counts)"]


# --------------------------------------------------------------------------- secrets

SECRET = "sk-very-secret-9f3a"


@pytest.mark.parametrize("value, where", [("[' ']", "2:14"), ("['']", "2:14"), ("['ok-key', 'two words']", "2:24"), ('["tab\\there"]', "2:14")])
def test_blank_or_spaced_api_keys_are_refused(value: str, where: str) -> None:
    found_where, message = only_problem(f"router:\n  api_keys: {value}\ninstances:\n" + GOOD_INSTANCE)
    assert (found_where, message) == (where, "api_keys: must not be empty or contain spaces or control characters")


@pytest.mark.parametrize("value", ["''", "'  '", f"'{SECRET} '"])
def test_blank_or_spaced_admin_token_is_refused_without_showing_it(value: str) -> None:
    found_where, message = only_problem(f"router:\n  admin_token: {value}\ninstances:\n" + GOOD_INSTANCE)
    assert found_where == "2:16" and message.startswith("admin_token: must not be empty") and SECRET not in message


def test_a_variable_holding_a_blank_key_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCTL_T_BLANK", " ")
    assert only_problem("router:\n  api_keys: ['${KVCTL_T_BLANK}']\ninstances:\n" + GOOD_INSTANCE)[1].startswith("api_keys: must not be empty")


def _secret_file(tmp_path: Path, router: str, mode: int) -> Path:
    path = tmp_path / "kvctl.yaml"
    path.write_text(f"router:\n{router}instances:\n" + GOOD_INSTANCE)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("router, key", [(f"  api_keys: ['{SECRET}']\n", "api_keys"), (f"  admin_token: {SECRET}\n", "admin_token")])
def test_literal_secrets_in_a_file_others_can_read_are_warned_about_without_the_secret(tmp_path: Path, router: str, key: str) -> None:
    path = _secret_file(tmp_path, router, 0o644)
    config = config_mod.load(path)
    assert config.warnings == (
        f"{path}:2:3: warning: router.{key} written in the file, which group/others can read (mode 0644): "
        "chmod 600 kvctl.yaml, or use ${VAR} to take them from the environment",
    )
    result = kvctl("config", "check", "-c", str(path))
    assert result.returncode == 0 and "chmod 600" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_no_secret_warning_at_mode_600_or_for_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_mod.load(_secret_file(tmp_path, f"  api_keys: ['{SECRET}']\n  admin_token: {SECRET}x\n", 0o600)).warnings == ()
    monkeypatch.setenv("KVCTL_T_KEY", SECRET)
    assert config_mod.load(_secret_file(tmp_path, "  api_keys: ['${KVCTL_T_KEY}']\n  admin_token: ${KVCTL_T_KEY}\n", 0o644)).warnings == ()


def test_anchors_and_merge_keys_work_and_errors_in_merged_keys_point_at_the_instance() -> None:
    shared = "  - &first\n    name: a\n    model: m\n    engine: sim\n    port: 12001\n    sim: {ttft_ms: 5}\n"
    config = config_mod.parse("instances:\n" + shared + "  - <<: *first\n    name: b\n    port: 12002\n", FILE)
    assert [(i.name, i.engine, i.port, i.sim.ttft_ms) for i in config.instances] == [("a", "sim", 12001, 5.0), ("b", "sim", 12002, 5.0)]
    bad = "instances:\n" + shared.replace("engine: sim", "engine: vllmm") + "  - <<: *first\n    name: b\n    port: 12002\n"
    found = problems(bad)
    assert len(found) == 2 and found[0].startswith(f"{FILE}:5:13: engine: unknown engine") and found[1].startswith(f"{FILE}:8:5: engine: unknown engine"), found


def test_docs_config_md_shows_every_key_as_the_schema_declares_it_and_stays_inside_the_repository() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    for heading, table in config_mod.reference_tables().items():
        section = doc.split(heading + "\n", 1)[1].split("\n#", 1)[0]
        # scripts/config_docs.py writes these tables from the schema
        assert table in section, (heading, table)
    keys = {heading: set(table) for heading, table in config_mod.REFERENCE.items()}
    assert {"enable_router", "router_port"} <= keys["## router"] and {"engine_args", "using_venv", "sim"} <= keys["## instances"]
    assert set(keys["### sim"]) == {field.name for field in dataclasses.fields(SimSettings)}
    links = re.findall(r"\]\(([^)]+)\)", doc)
    assert all(link.startswith("#") for link in links), links
    readme = (ROOT / "README.md").read_text()
    assert "(docs/config.md)" in readme and "../shared" not in readme + doc
