"""How every bench times its two sides: the same work, in one process, in rounds whose order alternates (A then B,
then B then A, ...) so that drifting machine load hits both, and the median over the rounds of the per-round ratio
(one slow round cannot move it). Timings on shared 2-core machines are noisy: never assert one in a test."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def alternating(paths: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every path once per round (each returns the seconds its work took), in reversed order every other
    round; returns {name: [seconds of round 0, 1, ...]}."""
    names = list(paths)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            seconds[name].append(paths[name]())
    return seconds


def median_ratio(seconds: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of seconds[numerator] / seconds[denominator] (a time ratio: < 1 means numerator faster)."""
    return statistics.median(a / b for a, b in zip(seconds[numerator], seconds[denominator], strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)
