"""The engines the sim imitates, and the names under which each publishes its gauges.

Written here from the real engines' sources, not taken from kvctl's adapters: a wrong name
in an adapter must not agree with itself through the sim (tests/test_engines.py checks
both against the names the real engines publish).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    running: str  # requests generating
    waiting: str  # requests waiting for a slot (or parked while asleep)
    kv_usage: str  # KV-cache usage, 0 to 1
    sleep_state: str | None = None  # labelled sleep_state=awake|weights_offloaded|discard_all, 1 for the current one


DIALECTS = {
    "vllm": Dialect(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_usage="vllm:kv_cache_usage_perc",
        sleep_state="vllm:engine_sleep_state",
    ),
    "sglang": Dialect(running="sglang:num_running_reqs", waiting="sglang:num_queue_reqs", kv_usage="sglang:token_usage"),
}
