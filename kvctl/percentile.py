"""One definition of a percentile for everything kvctl reports (`kvctl stats`, `kvctl bench`,
the router's traffic figures), so that the same samples always give the same p50."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: int) -> float | None:
    """The q-th percentile (1–99) by linear interpolation between closest ranks (the
    "inclusive" method of `statistics.quantiles`, numpy's default); None without values."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
