"""Label metrics for parsed captions: per-AU F1 and emotion accuracy / confusion.

Conventions (EXPBLIP.md, evaluation point 3):
- Per-AU F1 is sklearn's binary F1 with ``zero_division=0``. An AU absent from both truth and prediction in
  every sample has no precision or recall; it counts as F1 = 0 and stays in the mean, never skipped (skipping
  it is the known bug of earlier language-based evaluations). Scores are fractions in [0, 1], not percentages.
- Emotion accuracy: with one true emotion, a prediction is correct when it contains that emotion (a caption
  naming "happiness and surprise" is right for a happy face). Any other truth (several labels, as in RAF-DB
  compound or FaceME, or none) needs the exact set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from sklearn.metrics import f1_score


class AUF1(TypedDict):
    """Per-AU F1 scores and their unweighted mean."""

    per_au: dict[int, float]
    mean: float


def _check_pairs(truth: Sequence, pred: Sequence) -> None:
    """Raise when truth and prediction lists cannot be compared sample by sample."""
    if len(truth) != len(pred):
        raise ValueError(f"truth has {len(truth)} samples but pred has {len(pred)}; pass one label set per sample")
    if not truth:
        raise ValueError("no samples to score: truth and pred are empty")


def _indicator(labels: Sequence[set[int]], au: int) -> np.ndarray:
    """0/1 vector over samples: does each label set contain ``au``. Shape (n_samples,)."""
    return np.fromiter((au in s for s in labels), dtype=np.int64, count=len(labels))


def au_f1(truth: Sequence[set[int]], pred: Sequence[set[int]], aus: Sequence[int]) -> AUF1:
    """Binary F1 for each AU in ``aus`` (zero_division=0) and their mean; AUs outside ``aus`` are ignored."""
    _check_pairs(truth, pred)
    if not aus:
        raise ValueError("aus is empty: name the AUs to score, e.g. the 12 BP4D AUs")
    per_au = {
        au: float(f1_score(_indicator(truth, au), _indicator(pred, au), average="binary", zero_division=0))
        for au in aus
    }
    return {"per_au": per_au, "mean": float(np.mean(list(per_au.values())))}


def _emotion_correct(true: set[str], pred: set[str]) -> bool:
    """One true emotion: contained in the prediction. Otherwise: exact set match."""
    return true <= pred if len(true) == 1 else true == pred


def emotion_accuracy(truth: Sequence[set[str]], pred: Sequence[set[str]]) -> float:
    """Fraction of samples whose predicted emotions are correct (see the module docstring)."""
    _check_pairs(truth, pred)
    return sum(_emotion_correct(t, p) for t, p in zip(truth, pred, strict=True)) / len(truth)


def emotion_confusion(truth: Sequence[set[str]], pred: Sequence[set[str]], classes: Sequence[str]) -> np.ndarray:
    """Counts, shape (len(classes), len(classes) + 1): row = true class, column = predicted class.

    A prediction containing the true class counts on the diagonal (as in ``emotion_accuracy``); otherwise the
    first of ``classes`` it names; the last column counts predictions naming none of ``classes``. Samples whose
    truth is not exactly one of ``classes`` are skipped; their number is ``len(truth) - matrix.sum()``.
    """
    _check_pairs(truth, pred)
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes) + 1), dtype=np.int64)
    for true, guess in zip(truth, pred, strict=True):
        if len(true) != 1 or next(iter(true)) not in index:
            continue
        row = index[next(iter(true))]
        named = [index[c] for c in classes if c in guess]
        col = row if row in named else (named[0] if named else len(classes))
        matrix[row, col] += 1
    return matrix
