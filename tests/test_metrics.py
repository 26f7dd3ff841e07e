"""Per-AU F1 against sklearn's multi-label F1, and emotion accuracy / confusion on hand-made examples."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from expblip.eval.metrics import au_f1, emotion_accuracy, emotion_confusion

AUS = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]  # BP4D


def _sets(matrix: np.ndarray, aus: list[int]) -> list[set[int]]:
    """Rows of a 0/1 matrix (samples x AUs) as label sets."""
    return [{au for au, on in zip(aus, row, strict=True) if on} for row in matrix]


def test_au_f1_matches_sklearn_multilabel() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((200, len(AUS))) < 0.3
    pred = rng.random((200, len(AUS))) < 0.3
    truth[:, 9] = pred[:, 9] = False  # AU17 absent from truth and prediction everywhere
    pred[:, 10] = False  # AU23 never predicted
    expected = f1_score(truth, pred, average=None, zero_division=0)
    result = au_f1(_sets(truth, AUS), _sets(pred, AUS), AUS)
    assert list(result["per_au"]) == AUS
    np.testing.assert_allclose(list(result["per_au"].values()), expected)
    assert result["per_au"][17] == 0.0 and result["per_au"][23] == 0.0
    assert result["mean"] == pytest.approx(expected.mean())
    assert result["mean"] == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))


def test_au_f1_by_hand() -> None:
    truth = [{12}, {12, 6}, set(), {4}]
    pred = [{12}, {6}, {12}, {4, 99}]  # AU12: tp 1, fp 1, fn 1 -> 0.5; AU6: 1.0; AU4: 1.0; AU99 not scored
    result = au_f1(truth, pred, [4, 6, 12])
    assert result["per_au"] == {4: 1.0, 6: 1.0, 12: 0.5}
    assert result["mean"] == pytest.approx(2.5 / 3)


def test_au_f1_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="samples"):
        au_f1([{1}], [{1}, {2}], [1])


TRUTH = [{"happiness"}, {"sadness"}, {"anger"}, {"fear"}, {"happiness", "surprise"}, {"fear", "surprise"}]
PRED = [{"happiness", "surprise"}, {"anger"}, {"anger"}, set(), {"happiness", "surprise"}, {"surprise"}]


def test_emotion_accuracy_by_hand() -> None:
    # Correct: 0 (contains the single truth), 2, 4 (exact compound set). Wrong: 1, 3, 5 (compound needs both).
    assert emotion_accuracy(TRUTH, PRED) == pytest.approx(3 / 6)
    assert emotion_accuracy([set()], [set()]) == 1.0


def test_emotion_confusion_by_hand() -> None:
    classes = ["happiness", "sadness", "anger", "fear"]
    matrix = emotion_confusion(TRUTH, PRED, classes)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[0, 0] = 1  # happy, predicted happy+surprise
    expected[1, 2] = 1  # sad read as angry
    expected[2, 2] = 1
    expected[3, 4] = 1  # fear, no emotion parsed
    np.testing.assert_array_equal(matrix, expected)
    assert len(TRUTH) - matrix.sum() == 2  # the two compound samples are skipped


def test_eval_imports_no_training_stack() -> None:
    code = (
        "import sys, expblip.eval.parse, expblip.eval.metrics\n"
        "heavy = ('ray', 'deepspeed', 'torch', 'expblip.model', 'expblip.train')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
