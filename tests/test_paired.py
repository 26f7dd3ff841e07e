"""Paired intervals between evaluation results (expblip.eval.paired): the vectorised AU F1 equals the evaluator's,
a result against itself differs by exactly 0, a clearly better model is "met", and whole AU patterns are what is
resampled."""

from __future__ import annotations

import random

import numpy as np
import pytest

from expblip.data.captions import au_caption, concat_fusion, emotion_caption
from expblip.eval.intervals import MET, NOT_RESOLVED
from expblip.eval.metrics import au_f1
from expblip.eval.paired import _au_matrix, comparisons, interval, mean_au_f1

AUS = [1, 2, 4, 6, 12, 15]
PATTERNS = [((6, 12), "happiness"), ((1, 4, 15), "sadness"), ((1, 2), None), ((4,), None)]


def test_vectorised_au_f1_equals_the_evaluators():
    rng = random.Random(0)
    truth = [{au for au in AUS if rng.random() < 0.3} for _ in range(80)]
    pred = [{au for au in AUS if rng.random() < 0.3} for _ in range(80)] + [set()]
    truth.append(set())  # an AU nobody shows and nobody names scores 0, as zero_division=0 says
    assert mean_au_f1(_au_matrix(truth, AUS + [43]), _au_matrix(pred, AUS + [43])) == pytest.approx(
        au_f1(truth, pred, AUS + [43])["mean"])


def result(wrong_every: int, n: int = 120) -> dict:
    """An evaluation result over n faces drawn from 4 patterns; every `wrong_every`-th caption is wrong."""
    labels, captions = [], []
    for i in range(n):
        aus, emotion = PATTERNS[i % len(PATTERNS)]
        labels.append({"aus": list(aus), "emotions": [emotion] if emotion else None})
        right = not wrong_every or i % wrong_every != 0
        said = (list(aus), [emotion] if emotion else []) if right else ([2], ["anger"])
        captions.append(concat_fusion(au_caption(said[0]), emotion_caption(said[1])))
    best = {"mean_au_f1": {"score": 0.3, "key": "all_aus", "name": "every AU", "constant": True},
            "emotion_accuracy": {"score": 0.5, "key": "chance", "name": "chance", "constant": False}}
    baselines = [{"key": "all_aus", "caption": au_caption(AUS)}, {"key": "chance", "caption": None}]
    model = {"mean_au_f1": 1.0, "emotion_accuracy": 1.0}
    return {"items": {"keys": [f"k{i}" for i in range(n)], "captions": captions, "labels": labels},
            "settings": {"aus": AUS}, "best": best, "baselines": baselines, "model": model}


def test_a_result_against_itself_is_zero_and_a_clearly_better_one_is_met():
    good, worse = result(0), result(3)
    same = interval("mean_au_f1", good, good, n=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    better = interval("emotion_accuracy", good, worse, n=500)
    assert better.estimate > 0.2 and better.low > 0 and better.resampled == "groups" and better.units == 2
    rows = comparisons({"a": good, "b": worse}, "a", {"a": "A", "b": "B"})
    assert [(r["comparison"], r["metric"]) for r in rows] == [
        ("A − strongest baseline (every AU)", "mean_au_f1"), ("A − B", "mean_au_f1"),
        ("A − strongest baseline (chance)", "emotion_accuracy"), ("A − B", "emotion_accuracy")]
    assert rows[1]["verdict"] == MET and rows[2]["interval"]["estimate"] == pytest.approx(0.5)  # 1.0 − chance 0.5


def test_patterns_not_faces_are_resampled_so_two_patterns_decide_little():
    """On 2 emotion patterns, a model wrong on one whole pattern: by faces the interval would be narrow; by
    patterns it spans from all wrong to all right, and the verdict says the test set cannot tell."""
    good, half = result(0), result(0)
    half["items"]["captions"] = [c if lab["emotions"] != ["sadness"] else "The face shows anger." for c, lab in
                                 zip(half["items"]["captions"], half["items"]["labels"], strict=True)]
    iv = interval("emotion_accuracy", half, 0.5, n=500)
    assert iv.estimate == 0.0 and iv.low == pytest.approx(-0.5) and iv.high == pytest.approx(0.5)
    assert comparisons({"h": half, "g": good}, "h", {"h": "H", "g": "G"})[3]["verdict"] != MET
    assert np.isfinite(iv.low) and NOT_RESOLVED
    with pytest.raises(ValueError, match="different faces"):
        interval("mean_au_f1", good, {**good, "items": {**good["items"], "keys": list(reversed(good["items"]["keys"]))}})
