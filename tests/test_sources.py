"""Dataset converters: tiny trees in each dataset's own layout → records with the exact labels, by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import webdataset as wds
from conftest import launch_module, tiny_image, write_text

from expblip.data.captions import NO_AU_CAPTION, CaptionConfig
from expblip.data.shards import read_manifest, resolve_shards
from expblip.data.sources import SOURCES, default_caption_style, image_in_test, records, subject_split, subsample_mask

REPO = Path(__file__).resolve().parents[1]
DISFA_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)




def _by_frame(recs: list[dict]) -> dict[int, dict]:
    return {r["labels"]["frame"]: r for r in recs}


# ---------------------------------------------------------------- shared rules


def test_subsample_keeps_every_tenth_and_label_changes():
    labels = [[1]] * 12 + [[1, 2]] * 2 + [[1]] * 11  # 25 frames: a change at 12 and back at 14
    kept = [i for i, k in enumerate(subsample_mask(labels)) if k]
    assert kept == [0, 10, 12, 14, 20]


def test_subject_split_is_deterministic_exclusive_and_order_free():
    subjects = [f"S{i:02d}" for i in range(9)]
    train, test = subject_split(subjects, 1 / 3, seed=0)
    assert len(test) == 3 and set(train) | set(test) == set(subjects) and not set(train) & set(test)
    assert subject_split(reversed(subjects), 1 / 3, seed=0) == (train, test)
    records_in = [{"key": f"k{i}", "labels": {"subject": s}} for i, s in enumerate(subjects * 2)]
    assert subject_split(records_in, 1 / 3, seed=0) == (train, test)
    assert subject_split(subjects, 1 / 3, seed=1) != (train, test)
    assert subject_split(["A", "B"], 0.1, seed=0)[1] != []  # at least one test subject ...
    assert len(subject_split(["A", "B"], 0.9, seed=0)[0]) == 1  # ... and never all of them
    assert image_in_test("x.jpg", 0.5, 3) == image_in_test("x.jpg", 0.5, 3)


@pytest.mark.parametrize("source", sorted(set(SOURCES) - {"synthetic"}))
def test_missing_root_and_label_files_name_the_path(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="--root"):
        records(source, root="")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        records(source, root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*expected"):  # an empty root: what is missing, where
        list(records(source, root=str(tmp_path), split="all"))


def test_default_caption_styles():
    assert default_caption_style("bp4d") == "au" and default_caption_style("affectnet") == "emotion"
    with pytest.raises(ValueError, match="unknown source"):
        default_caption_style("ck+")


# ---------------------------------------------------------------- BP4D


BP4D_HEADER = "0,1,2,4,6,7,10,12,14,15,17,23,24,27"  # AU 27 lies outside BP4D's 12-AU subset


def _bp4d_row(frame: int, aus: set[int], unknown: int | None = None) -> str:
    cells = [str(9 if au == unknown else int(au in aus)) for au in map(int, BP4D_HEADER.split(",")[1:])]
    return ",".join([str(frame), *cells])


def _bp4d_tree(root: Path, subjects=("F001", "M002")) -> Path:
    for subject in subjects:
        rows = []
        for frame in range(1, 26):
            aus = {1, 27} if frame <= 12 else {1, 2} if frame <= 14 else {1}
            rows.append(_bp4d_row(frame, aus, unknown=4 if frame == 20 else None))  # frame 20: AU4 not coded
            if not (subject == "F001" and frame == 11):  # F001 frame 11 has labels but no image
                tiny_image(root / "2D+3D" / subject / "T1" / f"{frame:04d}.jpg", frame)
        write_text(root / "AUCoding" / "AU_OCC" / f"{subject}_T1.csv", "\n".join([BP4D_HEADER, *rows]) + "\n")
    return root


def test_bp4d_labels_subsampling_and_skips(tmp_path, caplog):
    root = _bp4d_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        recs = [r for r in records("bp4d", root=str(root), split="all") if r["labels"]["subject"] == "F001"]
    # labelled frames 1-19, 21-25 (20 is not coded); positions 0, 10, 20 = frames 1, 11, 22; changes at 13 and 15;
    # frame 11 has no image and is skipped.
    frames = _by_frame(recs)
    assert sorted(frames) == [1, 13, 15, 22]
    assert frames[13]["labels"] == {"aus": [1, 2], "emotions": None, "dataset": "bp4d", "subject": "F001",
                                    "sequence": "F001_T1", "task": "T1", "frame": 13}
    assert frames[1]["labels"]["aus"] == [1]  # AU 27 dropped: not in the subset
    assert frames[13]["captions"] == ["It is a people who raises inner eyebrow and raises outer eyebrow."]
    assert frames[13]["key"] == "bp4d-F001_T1-00013"
    assert frames[13]["image"] == (root / "2D+3D/F001/T1/0013.jpg").read_bytes()
    assert "missing image" in caplog.text and "not coded" in caplog.text

    everything = list(records("bp4d", root=str(root), split="all", subsample=False))
    assert len(everything) == 24 + 23  # 24 labelled frames each, F001 lacks one image


def test_bp4d_split_is_subject_exclusive(tmp_path):
    root = _bp4d_tree(tmp_path)
    train = {r["labels"]["subject"] for r in records("bp4d", root=str(root), split="train")}
    test = {r["labels"]["subject"] for r in records("bp4d", root=str(root), split="test")}
    assert train | test == {"F001", "M002"} and not train & test
    explicit = {r["labels"]["subject"] for r in records("bp4d", root=str(root), split="test", test_subjects="M002")}
    assert explicit == {"M002"}
    with pytest.raises(ValueError, match="F999"):
        records("bp4d", root=str(root), split="test", test_subjects=["F999"])


def test_bp4d_malformed_lines_name_file_and_line(tmp_path):
    root = _bp4d_tree(tmp_path, subjects=("F001",))
    csv = root / "AUCoding/AU_OCC/F001_T1.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines[:4], lines[4].replace(",0,", ",2,", 1), *lines[5:]]))
    with pytest.raises(ValueError, match=r"F001_T1\.csv:5: .*0, 1 or 9"):
        list(records("bp4d", root=str(root), split="all"))
    csv.write_text("\n".join([*lines[:2], "3,1,0", *lines[3:]]))
    with pytest.raises(ValueError, match=r"F001_T1\.csv:3: 3 cells"):
        list(records("bp4d", root=str(root), split="all"))


# ---------------------------------------------------------------- DISFA


def _disfa_tree(root: Path) -> Path:
    frames = range(1, 13)
    intensity = {1: {f: 0 if f <= 3 else 1 if f == 4 else 2 if f == 5 else 3 for f in frames},
                 12: {f: 5 if f == 8 else 0 for f in frames}}
    for au in DISFA_AUS:
        values = intensity.get(au, dict.fromkeys(frames, 0))
        kept = [f for f in frames if not (au == 26 and f == 12)]  # frame 12 is missing from the AU26 file
        write_text(root / "ActionUnit_Labels/SN001" / f"SN001_au{au}.txt", "".join(f"{f},{values[f]}\n" for f in kept))
    for f in frames:
        tiny_image(root / "Images_LeftCamera/SN001" / f"{f:05d}.jpg", f)
    return root


def test_disfa_intensity_threshold_and_subsampling(tmp_path, caplog):
    root = _disfa_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        frames = _by_frame(list(records("disfa", root=str(root), split="all")))
    # frame 4 has AU1 at intensity 1 (absent), frame 5 at 2 (present); AU12 only at frame 8.
    assert sorted(frames) == [1, 5, 8, 9, 11]
    assert frames[1]["labels"]["aus"] == [] and frames[1]["captions"] == [NO_AU_CAPTION]
    assert frames[5]["labels"]["aus"] == [1]
    assert frames[8]["labels"]["aus"] == [1, 12]
    assert frames[8]["labels"]["au_intensity"] == {**{str(au): 0 for au in DISFA_AUS}, "1": 3, "12": 5}
    assert frames[8]["labels"]["subject"] == "SN001" and frames[8]["labels"]["emotions"] is None
    assert "frame missing from some AU files" in caplog.text
    all_frames = _by_frame(list(records("disfa", root=str(root), split="all", subsample=False)))
    assert sorted(all_frames) == list(range(1, 12)) and all_frames[4]["labels"]["aus"] == []


def test_disfa_errors(tmp_path):
    root = _disfa_tree(tmp_path)
    path = root / "ActionUnit_Labels/SN001/SN001_au4.txt"
    path.write_text("1,0\n2,0\n3;1\n")
    with pytest.raises(ValueError, match=r"SN001_au4\.txt:3: expected 'frame,intensity'"):
        list(records("disfa", root=str(root), split="all"))
    path.write_text("1,0\n2,7\n")
    with pytest.raises(ValueError, match=r"SN001_au4\.txt:2: intensity must be 0\.\.5"):
        list(records("disfa", root=str(root), split="all"))
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"SN001_au4\.txt"):
        records("disfa", root=str(root), split="all")


# ---------------------------------------------------------------- GFT


def test_gft_labels_and_subject_split(tmp_path):
    header = "frame,AU1,AU2,AU4,AU6,AU10,AU12,AU14,AU15,AU23,AU24"
    videos = ["001A", "001B", "002A", "002B", "003C"]
    for v in videos:
        rows = [f"{f}," + ",".join("1" if (au == "AU12" and f >= 3) else "0" for au in header.split(",")[1:])
                for f in range(1, 6)]
        write_text(tmp_path / "AU_OCC" / f"{v}.csv", "\n".join([header, *rows]) + "\n")
        for f in range(1, 6):
            tiny_image(tmp_path / "images" / v / f"{f:06d}.jpg", f)
    frames = _by_frame([r for r in records("gft", root=str(tmp_path), split="all") if r["labels"]["subject"] == "001A"])
    assert sorted(frames) == [1, 3]  # position 0, and the frame where AU12 starts
    assert frames[3]["labels"]["aus"] == [12] and frames[3]["labels"]["sequence"] == "001A"
    assert frames[3]["captions"] == ["It is a people who pulls lip corner."]
    train = {r["labels"]["subject"] for r in records("gft", root=str(tmp_path), split="train")}
    test = {r["labels"]["subject"] for r in records("gft", root=str(tmp_path), split="test")}
    assert len(test) == 1 and train | test == set(videos) and not train & test


# ---------------------------------------------------------------- RAF-AU


def test_raf_au_prefixes_dropped_and_subset(tmp_path):
    write_text(tmp_path / "RAFAU_label.txt",
           "0001.jpg 1+2+L4+R12+25\n0002.jpg null\n0003.jpg 7+T9+B26 \n0004.jpg L14+R14\n")
    images = {n: tiny_image(tmp_path / "aligned" / f"{n}_aligned.jpg", i) for i, n in enumerate(["0001", "0002", "0003",
                                                                                              "0004"])}
    recs = {r["key"]: r for r in records("raf_au", root=str(tmp_path), split="all")}
    assert {k: r["labels"]["aus"] for k, r in recs.items()} == {
        "raf_au-0001": [1, 2, 4, 12, 25], "raf_au-0002": [], "raf_au-0003": [9, 26], "raf_au-0004": []}
    assert recs["raf_au-0001"]["labels"] == {"aus": [1, 2, 4, 12, 25], "emotions": None, "dataset": "raf_au",
                                             "subject": None, "frame": None}
    assert recs["raf_au-0002"]["captions"] == [NO_AU_CAPTION]
    assert recs["raf_au-0003"]["image"] == images["0003"]
    train = {r["key"] for r in records("raf_au", root=str(tmp_path), split="train", test_fraction=0.5)}
    test = {r["key"] for r in records("raf_au", root=str(tmp_path), split="test", test_fraction=0.5)}
    assert train | test == set(recs) and not train & test

    write_text(tmp_path / "RAFAU_label.txt", "0001.jpg 1+2\n\n0002.jpg 1+X2\n")
    with pytest.raises(ValueError, match=r"RAFAU_label\.txt:3: AU token 'X2'"):
        list(records("raf_au", root=str(tmp_path), split="all"))


# ---------------------------------------------------------------- EmotioNet


def test_emotionet_manual_labels_and_unknowns(tmp_path, caplog):
    aus = [1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26, 43]  # AU 43 lies outside the 11-AU subset

    def row(url: str, values: dict[int, int]) -> str:
        return ",".join([url, "orig", *(str(values.get(au, 0)) for au in aus)])

    rows = [row("http://a.example/x/face_1.jpg", {1: 1, 2: 999, 12: 1, 43: 1}),
            row("http://b.example/face_2.jpg", dict.fromkeys(aus, 999)),
            row("images/local_3.png", {25: 1, 26: 1})]
    write_text(tmp_path / "emotionet_manual.csv", "\n".join(["URL,URL orig," + ",".join(f"AU{a}" for a in aus), *rows]))
    tiny_image(tmp_path / "images/face_1.jpg", 1)
    png = tiny_image(tmp_path / "images/local_3.png", 3, fmt="PNG")
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        recs = list(records("emotionet", root=str(tmp_path), split="all"))
    assert [(r["labels"]["aus"], r["labels"]["aus_unknown"]) for r in recs] == [([1, 12], [2]), ([25, 26], [])]
    assert recs[0]["captions"] == ["It is a people who raises inner eyebrow and pulls lip corner."]
    assert recs[1]["image"] == png and recs[0]["labels"]["emotions"] is None
    assert recs[0]["key"].startswith("emotionet-face_1-") and "every AU unknown" in caplog.text

    write_text(tmp_path / "emotionet_manual.csv",
           "\n".join(["URL,URL orig," + ",".join(f"AU{a}" for a in aus), rows[0], row("u/y.jpg", {5: 2})]))
    with pytest.raises(ValueError, match=r"emotionet_manual\.csv:3: AU5 must be 0, 1 or 999"):
        list(records("emotionet", root=str(tmp_path), split="all"))


# ---------------------------------------------------------------- AffectNet


AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal")


def _affectnet_row(name: str, code: int) -> str:
    return f'{name},10,10,100,100,"1.0;2.0;3.0;4.0",{code},0.5,-0.2'


def test_affectnet_codes_and_dropped_classes(tmp_path, caplog):
    codes = {"1/a.jpg": 1, "1/b.jpg": 7, "2/c.jpg": 8, "2/d.jpg": 9, "2/e.jpg": 10, "3/f.jpg": 0}
    write_text(tmp_path / "Manually_Annotated_file_lists/training.csv",
           "\n".join([AFFECTNET_HEADER, *(_affectnet_row(n, c) for n, c in codes.items())]) + "\n")
    write_text(tmp_path / "Manually_Annotated_file_lists/validation.csv", _affectnet_row("4/g.jpg", 3) + "\n")  # no header
    for i, name in enumerate([*codes, "4/g.jpg"]):
        tiny_image(tmp_path / "Manually_Annotated_Images" / name, i)
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        train = list(records("affectnet", root=str(tmp_path), split="train"))
    assert {r["key"]: r["labels"]["emotions"] for r in train} == {
        "affectnet-1-a": ["happiness"], "affectnet-1-b": ["contempt"], "affectnet-3-f": ["neutral"]}
    assert train[0]["labels"]["aus"] is None and train[0]["captions"] == ["The face shows happiness."]
    assert "code 8 (none)" in caplog.text and "3 left out by rule" in caplog.text
    test = list(records("affectnet", root=str(tmp_path), split="test"))
    assert [r["labels"]["emotions"] for r in test] == [["surprise"]]
    assert len(list(records("affectnet", root=str(tmp_path), split="all"))) == 4

    write_text(tmp_path / "Manually_Annotated_file_lists/training.csv",
           "\n".join([AFFECTNET_HEADER, _affectnet_row("1/a.jpg", 1), _affectnet_row("1/b.jpg", 11)]) + "\n")
    with pytest.raises(ValueError, match=r"training\.csv:3: unknown emotion code 11"):
        list(records("affectnet", root=str(tmp_path), split="train"))


# ---------------------------------------------------------------- RAF-DB


def _rafdb_tree(root: Path) -> Path:
    basic = {"train_00001.jpg": 5, "train_00002.jpg": 4, "train_00003.jpg": 7, "test_0001.jpg": 1}
    compound = {"train_0001.jpg": 1, "train_0002.jpg": 11, "test_0001.jpg": 7}
    for part, labels in (("basic", basic), ("compound", compound)):
        write_text(root / part / "EmoLabel/list_patition_label.txt", "".join(f"{n} {c}\n" for n, c in labels.items()))
        for i, name in enumerate(labels):
            tiny_image(root / part / "Image/aligned" / name.replace(".jpg", "_aligned.jpg"), i)
    return root


def test_rafdb_basic_and_compound_mapping(tmp_path):
    root = _rafdb_tree(tmp_path)
    train = {r["key"]: r for r in records("rafdb", root=str(root), split="train")}
    assert {k: r["labels"]["emotions"] for k, r in train.items()} == {
        "rafdb_basic-train_00001": ["sadness"], "rafdb_basic-train_00002": ["happiness"],
        "rafdb_basic-train_00003": ["neutral"]}
    assert train["rafdb_basic-train_00002"]["labels"] == {"aus": None, "emotions": ["happiness"],
                                                          "dataset": "rafdb_basic", "subject": None, "frame": None}
    assert [r["labels"]["emotions"] for r in records("rafdb", root=str(root), split="test")] == [["surprise"]]

    compound = {r["key"]: r["labels"] for r in records("rafdb_compound", root=str(root), split="all")}
    assert compound == {
        "rafdb_compound-train_0001": {"aus": None, "emotions": ["happiness", "surprise"],
                                      "compound": "happily surprised", "dataset": "rafdb_compound",
                                      "subject": None, "frame": None},
        "rafdb_compound-train_0002": {"aus": None, "emotions": ["disgust", "surprise"],
                                      "compound": "disgustedly surprised", "dataset": "rafdb_compound",
                                      "subject": None, "frame": None},
        "rafdb_compound-test_0001": {"aus": None, "emotions": ["fear", "anger"], "compound": "fearfully angry",
                                     "dataset": "rafdb_compound", "subject": None, "frame": None},
    }
    first = next(records("rafdb_compound", root=str(root), caption=CaptionConfig(style="emotion")))
    assert first["captions"] == ["The face shows happiness and surprise."]
    # the part folder itself works as root too
    assert len(list(records("rafdb", root=str(root / "basic"), split="all"))) == 4


def test_rafdb_errors_and_missing_images(tmp_path, caplog):
    root = _rafdb_tree(tmp_path)
    (root / "basic/Image/aligned/train_00003_aligned.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        assert len(list(records("rafdb", root=str(root)))) == 2
    assert "missing image" in caplog.text and "1 skipped" in caplog.text
    write_text(root / "basic/EmoLabel/list_patition_label.txt", "train_00001.jpg 5\ntrain_00002.jpg 8\n")
    with pytest.raises(ValueError, match=r"list_patition_label\.txt:2: unknown emotion code 8"):
        list(records("rafdb", root=str(root)))
    write_text(root / "compound/EmoLabel/list_patition_label.txt", "train_0001.jpg\n")
    with pytest.raises(ValueError, match=r"list_patition_label\.txt:1: expected '<image name> <code>'"):
        list(records("rafdb_compound", root=str(root)))


# ---------------------------------------------------------------- FaceME


def _faceme_tree(root: Path, rows: list[str]) -> Path:
    names = ["happy", "surprised", "sad", "yawning"] + [f"label_{i:02d}" for i in range(81)]  # 85 labels
    write_text(root / "label_names.txt", "\n".join(names) + "\n")
    write_text(root / "annotations.csv", "\n".join(["image,annotator_1,annotator_2,annotator_3", *rows]) + "\n")
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        tiny_image(root / "images" / name, i)
    return root


def test_faceme_majority_of_three(tmp_path):
    root = _faceme_tree(tmp_path, ["a.jpg,happy;yawning,Happy,surprised;yawning",
                                   "b.jpg,surprised,,sad", "c.jpg,label_05;sad,label_05,label_05"])
    recs = {r["key"]: r["labels"] for r in records("faceme", root=str(root))}
    assert {k: (v["expressions"], v["emotions"]) for k, v in recs.items()} == {
        "faceme-a": (["happy", "yawning"], ["happiness"]),  # surprised had 1 vote only
        "faceme-b": ([], []),
        "faceme-c": (["label_05"], []),
    }
    assert recs["faceme-a"]["aus"] is None and recs["faceme-a"]["dataset"] == "faceme"
    with pytest.raises(ValueError, match="test_fraction=0"):
        records("faceme", root=str(root), split="test")

    _faceme_tree(tmp_path, ["a.jpg,happy,happy,happy", "b.jpg,happy,grumpy,"])
    with pytest.raises(ValueError, match=r"annotations\.csv:3: label\(s\) \['grumpy'\]"):
        list(records("faceme", root=str(root)))


# ---------------------------------------------------------------- end to end


def _make_shards_main():
    """launch/make_shards.py's main (a script, not a package module)."""
    return launch_module("make_shards").main


def test_make_shards_rafdb_end_to_end(tmp_path, capsys):
    main = _make_shards_main()

    root = _rafdb_tree(tmp_path / "RAF-DB")
    out = tmp_path / "shards"
    assert main(["rafdb", "--root", str(root), "--out", str(out), "--split", "train", "--samples-per-shard", "2"]) == 0
    manifest = read_manifest(str(out))
    assert manifest["total_samples"] == 3 and [s["samples"] for s in manifest["shards"]] == [2, 1]
    assert manifest["meta"]["source"] == "rafdb" and manifest["meta"]["caption_style"] == "emotion"
    urls, counts = resolve_shards(str(out))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == sum(counts) == 3
    labels = {s["__key__"]: json.loads(s["json"]) for s in samples}
    assert labels["rafdb_basic-train_00001"]["emotions"] == ["sadness"]
    assert labels["rafdb_basic-train_00001"]["captions"] == ["The face shows sadness."]
    assert samples[0]["jpg"] == (root / "basic/Image/aligned/train_00001_aligned.jpg").read_bytes()
    assert main(["rafdb", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
