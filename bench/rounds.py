"""How every bench times its two sides: the same work, in one process, in rounds whose order alternates (A then B,
then B then A, ...) so that drifting machine load hits both, and the median over the rounds of the per-round ratio
(one slow round cannot move it). Timings on shared 2-core machines are noisy: never assert one in a test.
The quality benches' trainings run side by side, one per core (side_by_side)."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Sequence


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


def side_by_side(calls: Sequence[Callable[[], None]], at_once: int = 2) -> None:
    """Run the calls in threads, ``at_once`` at a time (one per core), group after group in order. A failure is
    raised once its group has ended (else a thread's error would only be printed, and the bench would go on to
    score an export that was never written)."""
    for start in range(0, len(calls), at_once):
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_guarded, args=(c, errors)) for c in calls[start:start + at_once]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _guarded(call: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - raised by side_by_side once the group has ended
        errors.append(error)
