"""Intervals for every reported number: one paired bootstrap for a model, a model against a model, and a model
against a constant baseline; mean ± SD over seeds; and the verdict an interval supports.

    acc = paired_bootstrap(emotion_accuracy, truth, pred_a)                   # one model's score
    diff = paired_bootstrap(emotion_accuracy, truth, pred_a, pred_b)          # A − B on the same items
    vs_const = paired_bootstrap(emotion_accuracy, truth, pred_a, [{"happiness"}] * len(truth))  # A − constant
    vs_chance = paired_bootstrap(emotion_accuracy, truth, pred_a, 1 / 7)      # A − a fixed number
    f1 = paired_bootstrap(au_f1_mean(aus), truth_aus, pred_aus, groups=subject_ids)  # whole subjects resampled
    print(diff, verdict(diff, margin=0.05))   # +0.031 [-0.004, +0.066] ... met / not met / not resolved ...
    print(mean_sd([0.61, 0.64, 0.60]))        # 0.617 ± 0.021 (3 seeds)

Why one function. A difference is resampled *paired*: both models are scored on the same resampled items, so the
item-to-item difficulty they share cancels and the interval is the one of the difference, not of two separate
scores. A constant-caption baseline is a model like any other (its F1 moves with each resample's AU prevalence), so
it goes through the same path; only a number fixed before the test (chance computed from training labels) is
subtracted as is.

Why groups. Faces that share a pattern (one subject's video frames, one AU combination drawn many times) are not
independent: resampling single items then treats them as more evidence than they are and the interval is too narrow
(tests/test_intervals.py measures the under-coverage). With ``groups`` whole groups are resampled (the cluster
bootstrap), which keeps that dependence inside each resample.

The interval is the percentile interval of ``n`` resamples (seeded: the same inputs give the same interval). The
metric is any ``metric(truth, pred) -> float`` in expblip.eval.metrics' argument order, e.g. ``emotion_accuracy`` or
``au_f1_mean(aus)``; it is called twice per resample for a comparison, so a slow metric (sklearn's F1 per AU)
makes ``n`` the knob for time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from expblip.eval.metrics import au_f1

Metric = Callable[[Sequence, Sequence], float]  # metric(truth, pred) -> score, as in expblip.eval.metrics
MET, NOT_MET, NOT_RESOLVED = "met", "not met", "not resolved at this test size"


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval of one reported number (a score, or a difference A − B)."""

    estimate: float  # the number on the whole test set
    low: float  # lower percentile bound of the resampled numbers
    high: float  # upper percentile bound
    level: float  # e.g. 0.95
    items: int  # test items scored
    units: int  # what was resampled: items, or groups when groups were given
    resampled: str  # "items" or "groups"
    n: int  # resamples drawn

    def __str__(self) -> str:
        return (f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}] ({self.level:.0%} interval, {self.n} "
                f"resamples of {self.units} {self.resampled})")

    def as_dict(self) -> dict:
        return asdict(self)


def au_f1_mean(aus: Sequence[int]) -> Metric:
    """expblip.eval.metrics.au_f1's mean over ``aus`` as a metric(truth, pred) (the AU set fixed once)."""
    aus = list(aus)
    return lambda truth, pred: au_f1(truth, pred, aus)["mean"]


def paired_bootstrap(metric: Metric, truth: Sequence, a: Sequence, b: Sequence | float | None = None, *,
                     groups: Sequence[Hashable] | None = None, n: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Interval of metric(truth, a) − metric(truth, b) over resampled test items (or whole groups).

    b: None scores model A alone; a sequence of predictions (another model, a constant caption repeated) is
    rescored on every resample beside A; a float is a baseline fixed before the test and subtracted as is.
    """
    _check_inputs(truth, a, b, groups, n, level)

    def statistic(idx: np.ndarray) -> float:
        score = metric(_take(truth, idx), _take(a, idx))
        if b is None:
            return score
        return score - (float(b) if _is_number(b) else metric(_take(truth, idx), _take(b, idx)))

    everything = np.arange(len(truth))
    draws = _resamples(len(truth), groups, n, np.random.default_rng(seed))
    values = np.array([statistic(idx) for idx in draws])
    tail = (1.0 - level) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    units = len(set(groups)) if groups is not None else len(truth)
    return Interval(statistic(everything), float(low), float(high), level, len(truth), units,
                    "groups" if groups is not None else "items", n)


def _is_number(b: object) -> bool:
    return isinstance(b, int | float | np.number) and not isinstance(b, bool)


def _check_inputs(truth: Sequence, a: Sequence, b, groups, n: int, level: float) -> None:
    """Raise, naming the argument, before any resampling."""
    if len(truth) == 0:
        raise ValueError("no test items: truth is empty")
    lengths = {"a": len(a), **({"b": len(b)} if b is not None and not _is_number(b) else {}),
               **({"groups": len(groups)} if groups is not None else {})}
    wrong = {name: size for name, size in lengths.items() if size != len(truth)}
    if wrong:
        raise ValueError(f"truth has {len(truth)} items but {wrong}; pass one prediction (and group) per test item")
    if n < 100:
        raise ValueError(f"n={n} resamples are too few for percentile bounds; use n >= 1000 for reported numbers")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")


def _resamples(items: int, groups: Sequence[Hashable] | None, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n index arrays: items drawn with replacement, or whole groups drawn with replacement (their items kept)."""
    if groups is None:
        return list(rng.integers(0, items, size=(n, items)))
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(codes.max() + 1)]
    picks = rng.integers(0, len(members), size=(n, len(members)))
    return [np.concatenate([members[k] for k in row]) for row in picks]


def _take(values: Sequence, idx: np.ndarray) -> Sequence:
    """values[idx] for a numpy array, else a list of the picked elements (label sets stay Python sets)."""
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[i] for i in idx]


# ---------------------------------------------------------------- seeds and verdicts


@dataclass(frozen=True)
class MeanSD:
    """A number over training seeds: mean and sample SD (ddof=1; NaN for one seed, where no spread is measured)."""

    mean: float
    sd: float
    n: int

    def __str__(self) -> str:
        if self.n == 1:
            return f"{self.mean:.3f} (1 seed: no SD)"
        return f"{self.mean:.3f} ± {self.sd:.3f} ({self.n} seeds)"


def mean_sd(values: Sequence[float]) -> MeanSD:
    """Mean ± SD of one number over seeds; the SD is the sample SD (ddof=1), the spread another seed would show."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_sd() got no values: pass the number of each seed's run")
    return MeanSD(float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size))


def verdict(interval: Interval | tuple[float, float], margin: float = 0.0) -> str:
    """What an interval of A − B supports for the claim "A is no worse than B by more than ``margin``".

    met: the whole interval lies above −margin; not met: the whole interval lies below −margin; otherwise the test
    set is too small to tell. margin=0 is the plain claim "A beats B" (strictly above 0).
    """
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else interval
    if margin < 0:
        raise ValueError(f"margin is a tolerated loss and must be >= 0, got {margin}")
    if low > -margin:
        return MET
    if high < -margin:
        return NOT_MET
    return NOT_RESOLVED
