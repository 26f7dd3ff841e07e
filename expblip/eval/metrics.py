"""Label metrics for parsed captions: per-AU F1 and emotion accuracy / confusion.

Conventions (EXPBLIP.md, evaluation point 3):
- Per-AU F1 is sklearn's binary F1 with ``zero_division=0``. An AU absent from both truth and prediction in
  every sample has no precision or recall; it counts as F1 = 0 and stays in the mean, never skipped (skipping
  it is the known bug of earlier language-based evaluations). Scores are fractions in [0, 1], not percentages.
- Emotion accuracy: a prediction is right only when the set of emotions it names *equals* the true set. A face
  labelled with one emotion is right only when the caption names exactly that emotion: naming "happiness and
  surprise" for a happy face is wrong, as is naming none. (A containment rule would let one constant caption that
  names every emotion score 1.0.) Faces with several true emotions (RAF-DB compound, FaceME) need the same set.
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


def emotion_correct(true: set[str], pred: set[str]) -> bool:
    """The strict rule: the predicted emotions equal the true set (see the module docstring)."""
    return set(true) == set(pred)


def emotion_accuracy(truth: Sequence[set[str]], pred: Sequence[set[str]]) -> float:
    """Fraction of samples whose predicted emotion set equals the true set (see the module docstring)."""
    _check_pairs(truth, pred)
    return sum(emotion_correct(t, p) for t, p in zip(truth, pred, strict=True)) / len(truth)


CONFUSION_EXTRA = ("several", "none")  # the confusion matrix's last two columns


def emotion_confusion(truth: Sequence[set[str]], pred: Sequence[set[str]], classes: Sequence[str]) -> np.ndarray:
    """Counts, shape (len(classes), len(classes) + 2): row = true class, column = what the caption named.

    Column j < len(classes): the caption named exactly class j (the diagonal is what ``emotion_accuracy`` counts
    right); column "several": it named two or more emotions; column "none": it named no emotion. ``classes`` must
    cover every emotion a caption names alone (ValueError otherwise). Samples whose truth is not exactly one of
    ``classes`` are skipped; their number is ``len(truth) - matrix.sum()``.
    """
    _check_pairs(truth, pred)
    index = {name: i for i, name in enumerate(classes)}
    several, none = len(classes), len(classes) + 1
    matrix = np.zeros((len(classes), len(classes) + len(CONFUSION_EXTRA)), dtype=np.int64)
    for true, guess in zip(truth, pred, strict=True):
        if len(true) != 1 or next(iter(true)) not in index:
            continue
        row = index[next(iter(true))]
        if not guess:
            col = none
        elif len(guess) > 1:
            col = several
        elif next(iter(guess)) in index:
            col = index[next(iter(guess))]
        else:
            raise ValueError(f"a prediction names {sorted(guess)}, which is not one of the classes {list(classes)}; "
                             "pass classes that cover every emotion predicted alone")
        matrix[row, col] += 1
    return matrix
