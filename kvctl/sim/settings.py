"""The simulated engine's settings, declared once.

Each field is a `sim:` key of an instance in kvctl.yaml (kvctl/config/schema.py reads them against
these fields), a flag of `python -m kvctl.sim` (the key with dashes; kvctl/sim/__main__.py
derives its parser from them, the sim adapter its command line with `argv`) and a row of
docs/config.md's sim table. A new setting is one field here, plus what the sim does with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvctl import kvcached
from kvctl.settings import Bool, Choice, Integer, Kind, Number, fields_of, setting
from kvctl.sim.dialects import DIALECTS


@dataclass(frozen=True)
class SimSettings:
    """The simulated engine's settings: the `sim:` keys of an instance and, with dashes, the
    flags of `python -m kvctl.sim` (kvctl passes each one that differs from its default)."""

    dialect: str = setting("vllm", Choice(*DIALECTS), "whose HTTP API it speaks: endpoints, error shape, metric names, sleep semantics")
    load_seconds: float = setting(0.0, Number(), "delay before it listens, like an engine loading weights")
    ttft_ms: float = setting(0.0, Number(), "time to the first token")
    tokens_per_second: float = setting(0.0, Number(), "pace of streamed tokens (0: no pause)")
    sleep_seconds: float = setting(0.0, Number(), "how long a sleep (release) call takes")
    wake_seconds: float = setting(0.0, Number(), "how long a wake (resume) call takes")
    memory_gb: float | None = setting(
        None,
        Number(positive=True, optional=True),
        "`memory_bytes` it reports while awake (0 asleep; 60 % weights, 40 % KV cache)",
        default_text="the instance's `memory_gb`, else 1",
    )
    fail_rate: float = setting(0.0, Number(maximum=1.0), "fraction of generations answered 500")
    seed: int = setting(0, Integer(0), "seed of the `fail_rate` draws")
    crash_after: int | None = setting(None, Integer(0, optional=True), "exit (status 1) after serving N generations; 0 = on the first")
    hang_on_sleep: bool = setting(False, Bool(), "sleep calls never return (and change nothing)")
    hang_on_wake: bool = setting(False, Bool(), "wake calls never return (and change nothing)")
    wake_corrupts_weights: bool = setting(
        False, Bool(), "every wake leaves garbage weights (answers `!!!…`) until they are reloaded, like vLLM's level-2 bug (tests `sleep.verify`)"
    )
    reload_no_effect: bool = setting(False, Bool(), "reloading the weights does not repair them (the verify path that restarts the engine)")
    spawn_children: int = setting(
        0,
        Integer(0),
        "idle child processes it starts, as vLLM starts its EngineCore and workers; a clean stop ends them, a `kill -9` leaves them for the launcher to reap",
    )
    kv_bytes_per_token: int = setting(
        kvcached.SIM_KV_BYTES_PER_TOKEN,
        Integer(1),
        "with `ENABLE_KVCACHED=true` in its environment: KV cache each prompt or generated token of a running request holds in its kvcached segment "
        "(capacity: 40 % of `memory_gb`)",
        default_text=f"`{kvcached.SIM_KV_BYTES_PER_TOKEN}` (128 KiB)",
    )


FIELDS = fields_of(SimSettings)


def flags() -> dict[str, tuple[str, Kind]]:
    """`--flag-name` -> (the SimSettings attribute it sets, its check)."""
    out = {}
    for key, spec in FIELDS.items():
        assert isinstance(spec.convert, Kind) and spec.attr is not None  # every sim setting is a plain value
        out["--" + key.replace("_", "-")] = (spec.attr, spec.convert)
    return out


def argv(sim: SimSettings) -> list[str]:
    """The flags of `python -m kvctl.sim` that give these settings (each one not at its default)."""
    words: list[str] = []
    for flag, (attr, kind) in flags().items():
        value = getattr(sim, attr)
        if value != FIELDS[attr].default:
            words += kind.flag_args(flag, value)
    return words
