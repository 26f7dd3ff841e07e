"""The synthetic-face world: determinism, label rules, AU geometry, and that the AUs are learnable."""

import random

import numpy as np
import pytest
from conftest import launch_module
from PIL import Image

from expblip.data.captions import NO_AU_CAPTION, CaptionConfig, au_caption
from expblip.data.shards import read_manifest
from expblip.data.synthetic import (
    EXCLUSIVE_PAIRS,
    SYNTHETIC_AUS,
    SYNTHETIC_PROTOTYPES,
    draw_face,
    emotion_of,
    sample_labels,
    save_contact_sheet,
    synthetic_records,
)

# Row bands of a 64-px face (before the few-px jitter): forehead, eyes, mouth.
FOREHEAD, EYES, MOUTH = slice(6, 19), slice(22, 34), slice(41, 58)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _change(aus: list[int], seed: int = 3) -> np.ndarray:
    """Per-row mean absolute change that ``aus`` make to the same face (same style, same noise)."""
    base = _pixels(draw_face([], random.Random(seed)))
    moved = _pixels(draw_face(aus, random.Random(seed)))
    return np.abs(moved - base).mean(axis=(1, 2))


def test_records_are_deterministic_and_prefix_stable():
    a = list(synthetic_records(6, seed=5))
    b = list(synthetic_records(6, seed=5))
    assert [r["key"] for r in a] == [f"synthetic-train-5-{i:07d}" for i in range(6)]
    for ra, rb in zip(a, b, strict=True):
        assert ra["labels"] == rb["labels"] and ra["captions"] == rb["captions"]
        assert np.array_equal(_pixels(ra["image"]), _pixels(rb["image"]))
    first = next(synthetic_records(1, seed=5))  # record 0 does not depend on n
    assert np.array_equal(_pixels(first["image"]), _pixels(a[0]["image"]))
    other = next(synthetic_records(1, seed=6))
    assert not np.array_equal(_pixels(other["image"]), _pixels(a[0]["image"]))
    test_split = next(synthetic_records(1, seed=5, split="test"))
    assert test_split["key"] == "synthetic-test-5-0000000"
    assert not np.array_equal(_pixels(test_split["image"]), _pixels(a[0]["image"]))


def test_record_schema_and_default_au_captions():
    for rec in synthetic_records(40, seed=1, image_size=48):
        assert rec["image"].mode == "RGB" and rec["image"].size == (48, 48)
        labels = rec["labels"]
        assert labels["dataset"] == "synthetic" and labels["subject"] is None
        expected = au_caption(labels["aus"]) or NO_AU_CAPTION
        assert rec["captions"] == [expected]


def test_emotion_caption_style():
    recs = list(synthetic_records(30, seed=2, caption=CaptionConfig(style="emotion")))
    for rec in recs:
        assert bool(rec["captions"]) == bool(rec["labels"]["emotions"])
    assert any(rec["captions"] for rec in recs)


@pytest.mark.parametrize("mode", ["mixed", "independent", "prototype"])
def test_labels_obey_the_world_rules(mode):
    rng = random.Random(0)
    for _ in range(2000):
        labels = sample_labels(rng, mode)
        aus = labels["aus"]
        assert aus == sorted(set(aus)) and set(aus) <= set(SYNTHETIC_AUS)
        for a, b in EXCLUSIVE_PAIRS:
            assert not (a in aus and b in aus), (mode, aus)
        assert 26 not in aus or 25 in aus
        if labels["emotions"] is not None:  # an emotion is only given when the AUs are its prototype
            (emotion,) = labels["emotions"]
            assert tuple(aus) == SYNTHETIC_PROTOTYPES[emotion]


def test_prototype_mode_covers_every_emotion():
    rng = random.Random(1)
    seen = {sample_labels(rng, "prototype")["emotions"][0] for _ in range(400)}
    assert seen == set(SYNTHETIC_PROTOTYPES)
    assert SYNTHETIC_PROTOTYPES["happiness"] == (6, 12)
    assert SYNTHETIC_PROTOTYPES["surprise"] == (1, 2, 5, 25, 26)
    assert SYNTHETIC_PROTOTYPES["neutral"] == ()
    assert len(set(SYNTHETIC_PROTOTYPES.values())) == len(SYNTHETIC_PROTOTYPES)  # no two emotions alike
    assert emotion_of([1, 4, 15]) == ["sadness"] and emotion_of([1, 4]) is None


@pytest.mark.parametrize(
    "aus, where, elsewhere",
    [
        ([12], MOUTH, FOREHEAD),
        ([15], MOUTH, FOREHEAD),
        ([20], MOUTH, FOREHEAD),
        ([25], MOUTH, EYES),
        ([25, 26], MOUTH, FOREHEAD),
        ([43], EYES, MOUTH),
        ([5], EYES, MOUTH),
        ([1], FOREHEAD, MOUTH),
        ([2], FOREHEAD, MOUTH),
        ([4], EYES, MOUTH),
    ],
)
def test_each_au_changes_its_own_region(aus, where, elsewhere):
    change = _change(aus)
    assert change[where].mean() > 3 * change[elsewhere].mean() + 0.5, (aus, change[where].mean())


def test_undrawable_au_is_rejected():
    with pytest.raises(ValueError, match=r"cannot draw AU\(s\) \[10\]"):
        draw_face([10], random.Random(0))


def test_contact_sheet_holds_each_face_at_its_place_with_its_label_row(tmp_path):
    records = list(synthetic_records(10, seed=0))
    sheet = Image.open(save_contact_sheet(records, tmp_path / "sheet.png", columns=5)).convert("RGB")
    assert sheet.size == (5 * 128, 2 * (128 + 24))
    for k in (0, 4, 7):  # first, end of the first row, inside the second row: the face, zoomed 2x
        x, y = (k % 5) * 128, (k // 5) * (128 + 24)
        tile = sheet.crop((x, y, x + 128, y + 128))
        assert np.array_equal(_pixels(tile), _pixels(records[k]["image"].resize((128, 128), Image.Resampling.NEAREST)))
        label = _pixels(sheet.crop((x, y + 128, x + 128, y + 128 + 24)))
        assert (label < 128).any()  # its AU numbers (or "-") are written under it


# ---------------------------------------------------------------- learnability


def _features(images: list[Image.Image]) -> np.ndarray:
    """Horizontal and vertical gradient magnitudes, average-pooled 4x4: (n, 2 * 16 * 16) minus edges."""
    gray = np.stack([_pixels(im).mean(-1) / 255 for im in images])  # (n, 64, 64)
    gx, gy = np.abs(np.diff(gray, axis=2))[:, :-1, :], np.abs(np.diff(gray, axis=1))[:, :, :-1]  # (n, 63, 63)

    def pool(a: np.ndarray) -> np.ndarray:
        return a[:, :60, :60].reshape(len(a), 15, 4, 15, 4).mean((2, 4)).reshape(len(a), -1)

    return np.concatenate([pool(gx), pool(gy)], axis=1)


def _fit_predict(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, steps: int = 300) -> np.ndarray:
    """One class-balanced L2 logistic regression per AU, by full-batch gradient descent."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    pos = y.mean(0).clip(1e-3, 1 - 1e-3)
    weight = y * (0.5 / pos) + (1 - y) * (0.5 / (1 - pos))  # balanced: both classes count equally
    w, b = np.zeros((x.shape[1], y.shape[1])), np.zeros(y.shape[1])
    for _ in range(steps):
        grad = (1 / (1 + np.exp(-(x @ w + b))) - y) * weight / len(x)
        w -= 0.5 * (x.T @ grad + 1e-2 * w)
        b -= 0.5 * grad.sum(0)
    return (x_test @ w + b > 0).astype(np.float32)


def _dataset(n: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    recs = list(synthetic_records(n, seed=0, split=split))
    y = np.array([[au in r["labels"]["aus"] for au in SYNTHETIC_AUS] for r in recs], dtype=np.float32)
    return _features([r["image"] for r in recs]), y


def test_each_au_is_learnable_from_pixels():
    x, y = _dataset(400, "train")
    x_test, y_test = _dataset(200, "test")
    pred = _fit_predict(x, y, x_test)
    balanced = {}
    for j, au in enumerate(SYNTHETIC_AUS):
        truth, guess = y_test[:, j] == 1, pred[:, j] == 1
        balanced[au] = 0.5 * (guess[truth].mean() + (~guess[~truth]).mean())
    print("balanced accuracy per AU:", {au: round(float(v), 3) for au, v in balanced.items()})
    assert np.mean(list(balanced.values())) >= 0.75
    assert min(balanced.values()) >= 0.65, "an AU is barely visible"


def test_unknown_sampling_mode_is_rejected():
    with pytest.raises(ValueError, match="'uniform'"):
        sample_labels(random.Random(0), "uniform")  # type: ignore[arg-type]


def test_val_split_is_drawn_apart_from_train_and_test(tmp_path):
    """The split's name seeds every face, so a validation set chosen on val shares no face with test or train."""
    drawn = {split: list(synthetic_records(12, seed=0, split=split)) for split in ("train", "val", "test")}
    keys = {split: {r["key"] for r in recs} for split, recs in drawn.items()}
    pixels = {split: {r["image"].tobytes() for r in recs} for split, recs in drawn.items()}
    for other in ("train", "test"):
        assert not keys["val"] & keys[other] and not pixels["val"] & pixels[other], other
    assert len(pixels["val"]) == 12

    main = launch_module("make_shards").main
    assert main(["synthetic", "--out", str(tmp_path / "val"), "--samples", "3", "--split", "val"]) == 0
    manifest = read_manifest(str(tmp_path / "val"))
    assert manifest["meta"]["split"] == "val" and manifest["total_samples"] == 3


def test_real_datasets_need_a_val_fraction_for_split_val_naming_the_fix(capsys):
    with pytest.raises(SystemExit) as exited:
        launch_module("make_shards").main(["bp4d", "--root", "x", "--out", "y", "--split", "val"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--val-fraction F" in err and "--split train with the same --val-fraction" in err
    with pytest.raises(SystemExit):  # the synthetic world draws its own validation faces
        launch_module("make_shards").main(["synthetic", "--out", "y", "--split", "val", "--val-fraction", "0.2"])
    assert "draws its own validation faces" in capsys.readouterr().err
