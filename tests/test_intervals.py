"""expblip.eval.intervals: the bootstrap interval covers a known truth as often as it says, groups matter when
items share a pattern, baselines go through the same path, and verdicts follow the interval."""

import math

import numpy as np
import pytest

from expblip.eval.intervals import (
    MET,
    NOT_MET,
    NOT_RESOLVED,
    Interval,
    au_f1_mean,
    mean_sd,
    paired_bootstrap,
    verdict,
)
from expblip.eval.metrics import au_f1, emotion_accuracy

EXPERIMENTS = 200  # simulated test sets per coverage check
RESAMPLES = 500  # per interval: enough for 2.5 % percentiles here, and keeps each check to ~1-2 s on one core
# Coverage band: a 95 % interval covers in 190 of 200 experiments on average; the binomial SD of the covered share is
# sqrt(0.95 * 0.05 / 200) = 1.5 points, so 90 %..99 % is about -3.2 SD..+2.6 SD. The seeds are fixed: the measured
# shares below are the same on every run (they cannot flake); the band says how far they may sit from 95 %.
LOW_COVER, HIGH_COVER = 0.90, 0.99


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Plain accuracy on numpy label vectors (fast enough for thousands of resamples)."""
    return np.count_nonzero(truth == pred) / len(truth)  # np.mean costs 3x more per call


def _predictions(truth: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """The true class where correct, another class where not (4 classes)."""
    return np.where(correct, truth, (truth + 1) % 4)


def _paired_models(rng: np.random.Generator, items: int, p_a: float, p_b: float):
    """Truth and two models with true accuracies p_a, p_b whose mistakes overlap (half the items share a difficulty),
    as two models scored on the same faces do."""
    truth = rng.integers(0, 4, size=items)
    u = rng.random(items)
    v = np.where(rng.random(items) < 0.5, u, rng.random(items))  # still uniform: B's marginal accuracy is p_b
    return truth, _predictions(truth, u < p_a), _predictions(truth, v < p_b)


def _covered(interval: Interval, truth: float) -> bool:
    return interval.low <= truth <= interval.high


@pytest.mark.parametrize(("p_a", "p_b", "compare"), [(0.75, 0.70, True), (0.70, 0.70, True), (0.70, None, False)])
def test_interval_covers_the_true_score_or_difference_about_95_percent_of_the_time(p_a, p_b, compare):
    rng = np.random.default_rng(20)
    true_value = p_a - p_b if compare else p_a
    hits = 0
    for k in range(EXPERIMENTS):
        truth, a, b = _paired_models(rng, 200, p_a, p_b if compare else 0.5)
        interval = paired_bootstrap(accuracy, truth, a, b if compare else None, n=RESAMPLES, seed=k)
        hits += _covered(interval, true_value)
    # measured with these seeds: 0.97 (A-B = 0.05), 0.96 (A-B = 0), 0.96 (A alone)
    assert LOW_COVER <= hits / EXPERIMENTS <= HIGH_COVER, hits


def _clustered_models(rng: np.random.Generator, n_groups: int, size: int):
    """Faces in groups sharing a pattern: each model's accuracy differs per group (uniform 0.1..0.9, so 0.5 on
    average for both: the true difference is 0), and items of one group are only as independent as that allows."""
    truth = rng.integers(0, 4, size=n_groups * size)
    groups = np.repeat(np.arange(n_groups), size)
    p_a, p_b = rng.uniform(0.1, 0.9, n_groups)[groups], rng.uniform(0.1, 0.9, n_groups)[groups]
    rand = rng.random((2, truth.size))
    return truth, _predictions(truth, rand[0] < p_a), _predictions(truth, rand[1] < p_b), groups


def test_shared_patterns_need_group_resampling():
    """Resampling items treats 10 faces of one pattern as 10 independent faces: the interval is too narrow and
    misses the truth far more often than 5 %. Resampling whole groups restores the coverage."""
    rng = np.random.default_rng(21)
    item_hits = group_hits = 0
    for k in range(EXPERIMENTS):
        truth, a, b, groups = _clustered_models(rng, n_groups=40, size=10)
        item_hits += _covered(paired_bootstrap(accuracy, truth, a, b, n=RESAMPLES, seed=k), 0.0)
        group_hits += _covered(paired_bootstrap(accuracy, truth, a, b, groups=groups, n=RESAMPLES, seed=k), 0.0)
    # measured with these seeds: items 0.68, groups 0.935 (design effect 1 + 9 * 0.21 ~ 2.9: item SEs ~1.7x too
    # small, so a nominal 95 % item interval is really a ~75 % one)
    assert item_hits / EXPERIMENTS < 0.85, item_hits
    assert LOW_COVER <= group_hits / EXPERIMENTS <= HIGH_COVER, group_hits


def test_group_interval_reports_what_was_resampled():
    truth = np.array([0, 1, 0, 1, 1, 0])
    interval = paired_bootstrap(accuracy, truth, truth, groups=["s1", "s1", "s2", "s2", "s3", "s3"], n=200)
    assert (interval.resampled, interval.units, interval.items) == ("groups", 3, 6)
    assert interval.estimate == interval.low == interval.high == 1.0


# ---------------------------------------------------------------- baselines go the same way


def test_a_constant_caption_baseline_is_rescored_on_each_resample_like_a_model():
    """Model − constant "happiness" caption through paired_bootstrap equals the interval of one metric that scores
    both on the same resampled faces: the baseline is paired with the model, not a fixed number."""
    rng = np.random.default_rng(3)
    emotions = ["happiness", "sadness", "anger"]
    truth = [{emotions[k]} for k in rng.integers(0, 3, size=60)]
    pred = [t if rng.random() < 0.7 else {"surprise"} for t in truth]
    constant = [{"happiness"}] * len(truth)
    got = paired_bootstrap(emotion_accuracy, truth, pred, constant, n=300, seed=5)

    def model_minus_constant(t, pairs):
        return emotion_accuracy(t, [p for p, _ in pairs]) - emotion_accuracy(t, [c for _, c in pairs])

    expected = paired_bootstrap(model_minus_constant, truth, list(zip(pred, constant, strict=True)), n=300, seed=5)
    assert (got.estimate, got.low, got.high) == pytest.approx((expected.estimate, expected.low, expected.high))


def test_a_constant_every_au_caption_has_an_interval_of_its_own():
    """Its F1 moves with each resample's AU prevalence, so it is resampled like a model (au_f1_mean reuses
    expblip.eval.metrics.au_f1)."""
    aus = [1, 4, 12]
    rng = np.random.default_rng(4)
    truth = [{au for au in aus if rng.random() < 0.35} for _ in range(40)]
    constant = [set(aus)] * len(truth)
    alone = paired_bootstrap(au_f1_mean(aus), truth, constant, n=100, seed=5)
    assert alone.estimate == pytest.approx(au_f1(truth, constant, aus)["mean"])
    assert alone.low < alone.estimate < alone.high


def test_a_fixed_number_baseline_shifts_the_interval_exactly():
    truth = [{"happiness"}, {"sadness"}, {"anger"}, {"happiness"}] * 10
    pred = [{"happiness"}, {"sadness"}, set(), {"anger"}] * 10
    alone = paired_bootstrap(emotion_accuracy, truth, pred, n=300, seed=1)
    chance = paired_bootstrap(emotion_accuracy, truth, pred, 1 / 3, n=300, seed=1)
    assert chance.estimate == pytest.approx(alone.estimate - 1 / 3) == pytest.approx(0.5 - 1 / 3)
    assert (chance.low, chance.high) == pytest.approx((alone.low - 1 / 3, alone.high - 1 / 3))


def test_same_inputs_same_interval_and_bad_inputs_named():
    truth = np.array([0, 1, 1, 0, 1])
    assert paired_bootstrap(accuracy, truth, truth[::-1], n=200, seed=4) == \
        paired_bootstrap(accuracy, truth, truth[::-1], n=200, seed=4)
    with pytest.raises(ValueError, match="truth has 5 items but {'b': 4}"):
        paired_bootstrap(accuracy, truth, truth, truth[:4])
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(accuracy, truth, truth, groups=[1, 2])
    with pytest.raises(ValueError, match="n >= 1000"):
        paired_bootstrap(accuracy, truth, truth, n=10)


# ---------------------------------------------------------------- verdicts and seeds


@pytest.mark.parametrize(("low", "high", "margin", "expected"), [
    (0.01, 0.08, 0.0, MET),            # A beats B: the whole interval above 0
    (-0.03, 0.04, 0.0, NOT_RESOLVED),  # straddles 0: this test set cannot tell
    (-0.09, -0.01, 0.0, NOT_MET),      # the whole interval below 0
    (-0.04, 0.02, 0.05, MET),          # "within 0.05": every plausible loss is smaller than 0.05
    (-0.07, 0.02, 0.05, NOT_RESOLVED),  # a loss beyond 0.05 is still plausible
    (-0.12, -0.06, 0.05, NOT_MET),     # every plausible loss exceeds 0.05
    (-0.05, 0.01, 0.05, NOT_RESOLVED),  # a bound exactly on the margin decides nothing
])
def test_verdict_only_where_the_interval_supports_it(low, high, margin, expected):
    assert verdict((low, high), margin) == expected
    assert verdict(Interval(0.0, low, high, 0.95, 10, 10, "items", 1000), margin) == expected


def test_verdict_refuses_a_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        verdict((0.0, 0.1), margin=-0.05)


def test_mean_sd_over_seeds():
    three = mean_sd([0.60, 0.62, 0.64])
    assert (three.mean, three.sd, three.n) == pytest.approx((0.62, 0.02, 3))  # ddof=1: sqrt(0.0008 / 2)
    assert str(three) == "0.620 ± 0.020 (3 seeds)"
    one = mean_sd([0.5])
    assert one.mean == 0.5 and math.isnan(one.sd) and "no SD" in str(one)
    with pytest.raises(ValueError, match="no values"):
        mean_sd([])
