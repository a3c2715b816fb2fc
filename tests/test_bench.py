"""`kvctl bench` end to end: the real CLI against a real router and sim engines, or a sim directly."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import KVCTL, Procs, cli_env, free_port, kvctl, sim_instance, start_engines, start_router, wait_for, wait_http_ok, write_config

TTFT_MS = 40.0
TOKENS_PER_SECOND = 100.0  # 10 ms between tokens
METRICS = ("ttft_ms", "itl_ms", "e2e_latency_ms")
COUNTS = ("requests", "ok", "failed", "errors", "request_rate", "output_tokens", "output_tokens_per_second")


def check_metrics(m: dict[str, Any]) -> None:
    for key in COUNTS + METRICS:
        assert key in m, key
    for key in METRICS:
        dist = m[key]
        assert dist["p50"] <= dist["p90"] <= dist["p99"], (key, dist)
    for q in ("p50", "p90", "p99"):
        assert m["ttft_ms"][q] <= m["e2e_latency_ms"][q]


@pytest.fixture
def tree(procs: Procs, tmp_path: Path):
    """Two paced sim engines behind a real router; api_keys set so bench must send one."""
    pace = {"ttft_ms": TTFT_MS, "tokens_per_second": TOKENS_PER_SECOND}
    config = write_config(
        tmp_path, [sim_instance("org/model-a", name="a", **pace), sim_instance("model-b", name="b", **pace)], router={"api_keys": ["bench-key"]}
    )
    start_engines(procs, config)
    start_router(procs, config, token="bench-key")
    return config


def test_bench_through_router_reports_every_metric(tree, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = kvctl("bench", "-c", str(tree.path), "--requests", "40", "--concurrency", "8", "--max-tokens", "8", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["overall"]["ok"] == 40 and report["overall"]["failed"] == 0
    assert set(report["models"]) == {"org/model-a", "model-b"}
    for model in report["models"].values():
        assert model["ok"] == 20  # round-robin over the configured models
        assert model["output_tokens"] == 20 * 8  # from the usage the sim reports
        check_metrics(model)
    overall = report["overall"]
    check_metrics(overall)
    # Measured against the sim's known pacing, within a sane factor.
    assert overall["ttft_ms"]["p50"] >= TTFT_MS and overall["ttft_ms"]["p99"] <= 5 * TTFT_MS + 50
    itl = 1000 / TOKENS_PER_SECOND
    assert 0.5 * itl <= overall["itl_ms"]["p50"] and overall["itl_ms"]["p99"] <= 5 * itl + 50
    assert overall["e2e_latency_ms"]["p50"] >= TTFT_MS + 7 * 0.5 * itl
    assert "org/model-a" in result.stdout and "overall" in result.stdout  # the rich table


def test_bench_rate_mode_and_completions_endpoint(tree, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = kvctl(
        "bench",
        "-c",
        str(tree.path),
        "--rate",
        "40",
        "--requests",
        "20",
        "--endpoint",
        "completions",
        "--model",
        "model-b",
        "--max-tokens",
        "4",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["model-b"]
    assert report["overall"]["ok"] == 20 and report["spec"]["rate"] == 40


def test_bench_without_the_api_key_fails_with_401(tree, tmp_path: Path) -> None:
    result = kvctl("bench", "--url", tree.router.url, "--model", "model-b", "--requests", "3", "--api-key", "wrong")
    assert result.returncode == 1
    assert "HTTP 401" in result.stdout and "3 of 3 requests failed" in result.stderr


@pytest.mark.parametrize("suffix, stream", [("/v1", True), ("/", False)])
def test_bench_url_at_a_sim_directly(procs: Procs, tmp_path: Path, suffix: str, stream: bool) -> None:
    port = free_port()
    procs.start_sim("direct-model", port, "--ttft-ms", "5")
    wait_http_ok(f"http://127.0.0.1:{port}/health")
    out = tmp_path / "bench.json"
    # No config here and no --model: the model comes from GET /v1/models.
    result = kvctl(
        "bench",
        "--url",
        f"http://127.0.0.1:{port}{suffix}",
        "--requests",
        "12",
        "--concurrency",
        "3",
        "--max-tokens",
        "5",
        "--stream" if stream else "--no-stream",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    overall = report["overall"]
    assert list(report["models"]) == ["direct-model"]
    assert overall["ok"] == 12 and overall["output_tokens"] == 12 * 5
    if stream:
        check_metrics(overall)
    else:  # no stream: no first token to time
        assert overall["ttft_ms"]["p50"] is None and overall["e2e_latency_ms"]["p50"] > 0


def test_bench_reports_failures_and_exit_status(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    procs.start_sim("flaky", port, "--fail-rate", "1.0")
    wait_http_ok(f"http://127.0.0.1:{port}/health")
    out = tmp_path / "bench.json"
    args = ("bench", "--url", f"http://127.0.0.1:{port}", "--model", "flaky", "--requests", "10", "--concurrency", "4", "--json", str(out))
    result = kvctl(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert "error: 10 of 10 requests failed" in result.stderr
    assert "HTTP 500" in result.stdout and "simulated engine failure" in result.stdout
    report = json.loads(out.read_text())
    assert report["overall"]["failed"] == 10 and report["overall"]["ok"] == 0
    assert report["overall"]["errors"][0]["count"] == 10 and "HTTP 500" in report["overall"]["errors"][0]["message"]
    assert kvctl(*args, "--allow-errors", cwd=tmp_path).returncode == 0


def test_bench_unreachable_target_is_a_reported_failure(tmp_path: Path) -> None:
    result = kvctl("bench", "--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--requests", "2", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot connect" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--requests", "5", "--duration", "1"), "not both"),
        (("--requests", "0"), "--requests must be positive"),
        (("--endpoint", "embeddings"), "--endpoint must be one of"),
        (("--url", "ftp://x"), "must start with http"),
    ],
)
def test_bench_bad_options_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    base = () if "--url" in args else ("--url", "http://127.0.0.1:9")
    result = kvctl("bench", *base, "--model", "m", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_bench_ctrl_c_reports_what_finished(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    procs.start_sim("slow", port, "--ttft-ms", "20")
    wait_http_ok(f"http://127.0.0.1:{port}/health")
    out = tmp_path / "bench.json"
    bench = procs.start(
        [*KVCTL, "bench", "--url", f"http://127.0.0.1:{port}", "--model", "slow", "--duration", "60", "--json", str(out)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/sim/state", timeout=2).json()["requests_served"] >= 5, timeout=30, what="bench to have sent requests")
    bench.send_signal(signal.SIGINT)
    stdout, stderr = bench.communicate(timeout=30)
    assert bench.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and report["overall"]["ok"] >= 1
    assert "slow" in stdout
