"""Timings people can trust on a shared CPU: a warm-up, then the median of several runs, the calls alternated so
that neither side always runs first, with the spread reported beside the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPEATS = 5
"""Timed runs per call on the interactive surfaces (`crop ask`, `crop demo`, the web page)."""


@dataclass(frozen=True)
class Timing:
    """Seconds of `runs` timed runs: their median and range."""

    median: float
    low: float
    high: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median * 1000:.1f} ms (range {self.low * 1000:.1f}-{self.high * 1000:.1f})"


def alternating_timings(
    calls: dict[str, Callable[[], Any]], repeats: int = REPEATS, warmup: int = 1
) -> dict[str, Timing]:
    """Run every call `warmup` times untimed, then `repeats` timed rounds, the order reversed every other round."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {
        name: Timing(statistics.median(values), min(values), max(values), len(values))
        for name, values in seconds.items()
    }


def describe_method(repeats: int = REPEATS) -> str:
    """How the timings shown were taken, in one line."""
    return f"median of {repeats} runs after a warm-up, full and pruned alternating"
