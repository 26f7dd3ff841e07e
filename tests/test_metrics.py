"""Per-AU F1 against F1 counted by hand (tp/fp/fn), and the strict emotion rule / confusion on hand-made examples."""

import subprocess
import sys

import numpy as np
import pytest

from expblip.eval.metrics import au_f1, emotion_accuracy, emotion_confusion

AUS = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]  # BP4D


def _sets(matrix: np.ndarray, aus: list[int]) -> list[set[int]]:
    """Rows of a 0/1 matrix (samples x AUs) as label sets."""
    return [{au for au, on in zip(aus, row, strict=True) if on} for row in matrix]


def _f1_by_counting(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """F1 = 2 tp / (2 tp + fp + fn) per column, 0 where the denominator is 0: the definition, not sklearn."""
    tp = (truth & pred).sum(axis=0)
    fp = (~truth & pred).sum(axis=0)
    fn = (truth & ~pred).sum(axis=0)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def test_au_f1_matches_the_definition_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((200, len(AUS))) < 0.3
    pred = rng.random((200, len(AUS))) < 0.3
    truth[:, 9] = pred[:, 9] = False  # AU17 absent from truth and prediction everywhere: F1 0, still in the mean
    pred[:, 10] = False  # AU23 never predicted
    expected = _f1_by_counting(truth, pred)
    result = au_f1(_sets(truth, AUS), _sets(pred, AUS), AUS)
    assert list(result["per_au"]) == AUS
    np.testing.assert_allclose(list(result["per_au"].values()), expected)
    assert result["per_au"][17] == 0.0 and result["per_au"][23] == 0.0
    assert 0.2 < result["mean"] < 0.35  # random 30 % labels: F1 near 0.3 for ten AUs, 0 for two
    assert result["mean"] == pytest.approx(expected.sum() / len(AUS))  # the two zero AUs are not skipped


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


def test_emotion_accuracy_is_the_strict_set_rule() -> None:
    # Right: 2 (exactly anger), 4 (exactly the compound set). Wrong: 0 (a second emotion named), 1, 3 (none named),
    # 5 (half of the compound set).
    assert emotion_accuracy(TRUTH, PRED) == pytest.approx(2 / 6)
    assert emotion_accuracy([{"happiness"}], [{"happiness"}]) == 1.0
    assert emotion_accuracy([{"happiness"}], [{"happiness", "sadness"}]) == 0.0


def test_a_caption_naming_every_emotion_scores_nothing_on_single_labels() -> None:
    from expblip.data.facs import EMOTIONS

    truth = [{e} for e in EMOTIONS] * 3
    assert emotion_accuracy(truth, [set(EMOTIONS)] * len(truth)) == 0.0


def test_emotion_confusion_by_hand() -> None:
    classes = ["happiness", "sadness", "anger", "fear"]
    matrix = emotion_confusion(TRUTH, PRED, classes)
    expected = np.zeros((4, 6), dtype=np.int64)  # columns: the 4 classes, several, none
    expected[0, 4] = 1  # happy, caption named happiness and surprise: "several", not the diagonal
    expected[1, 2] = 1  # sad read as angry
    expected[2, 2] = 1
    expected[3, 5] = 1  # fear, no emotion parsed
    np.testing.assert_array_equal(matrix, expected)
    assert len(TRUTH) - matrix.sum() == 2  # the two compound samples are skipped
    assert np.trace(matrix[:, :4]) / matrix.sum() == emotion_accuracy(TRUTH[:4], PRED[:4])


def test_emotion_confusion_names_a_prediction_outside_its_classes() -> None:
    with pytest.raises(ValueError, match="contempt"):
        emotion_confusion([{"happiness"}], [{"contempt"}], ["happiness"])


def test_eval_imports_no_training_stack() -> None:
    code = (
        "import sys, expblip.infer.parse, expblip.eval.metrics\n"
        "heavy = ('ray', 'deepspeed', 'torch', 'expblip.model', 'expblip.train')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
