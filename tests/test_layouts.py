"""Datasets as users hold them: each layout variant the public readers expect (docs/datasets.md cites them), laid out
in tmp_path, converted with counts and labels checked (AUs by number, emotions by name), and the refused layouts
failing with a message that says what to rename, unpack or pass."""

from __future__ import annotations

import json
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import launch_module, tiny_image, write_text

from expblip.data.shards import MANIFEST, PARTIAL_MANIFEST, read_manifest, resolve_shards
from expblip.data.sources import records
from expblip.data.sources._common import ConversionError
from expblip.data.sources._video import FrameNumberingError, detect_offset
from expblip.data.sources.convert import ConvertRequest

BP4D_HEADER = "0,1,2,4,6,7,10,12,14,15,17,23,24"
DISFA_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)




def _labels(recs: list[dict], field: str = "aus") -> dict[str, object]:
    return {r["key"]: r["labels"][field] for r in recs}


# ---------------------------------------------------------------- BP4D


def _bp4d_labels(root: Path, subjects=("F001", "M002"), first: int = 2440) -> dict[tuple[str, int], list[int]]:
    """AUCoding/AU_OCC CSVs of 3 frames per subject; frame `first + i` has AU 1 and, from i = 1, AU 12."""
    truth = {}
    for subject in subjects:
        rows = [BP4D_HEADER]
        for i in range(3):
            aus = [1, 12] if i else [1]
            truth[(subject, first + i)] = aus
            cells = ("1" if int(c) in aus else "0" for c in BP4D_HEADER.split(",")[1:])
            rows.append(",".join([str(first + i), *cells]))
        write_text(root / "AUCoding/AU_OCC" / f"{subject}_T1.csv", "\n".join(rows) + "\n")
    return truth


def _bp4d_frames(folder: Path, subjects=("F001", "M002"), first: int = 2440, pad: int = 4) -> dict:
    return {(s, first + i): tiny_image(folder / s / "T1" / f"{first + i:0{pad}d}.jpg", i)
            for s in subjects for i in range(3)}


@pytest.mark.parametrize("frames_at, pad", [
    ("Sequences(2D+3D)", 4),  # a copy mirrored from the Binghamton server ...
    ("www.cs.binghamton.edu/~gaic/BP4D/Sequences(2D+3D)", 4),  # ... with the server's path kept by wget
    ("img", 0),  # ME-GraphAU's data/BP4D/img/F001/T1/2440.jpg
    (".", 0),  # PyTorch-JAANet's dataset/BP4D/F001/T1/2440.jpg
])
def test_bp4d_frame_folder_variants(tmp_path, frames_at, pad):
    truth = _bp4d_labels(tmp_path)
    images = _bp4d_frames(tmp_path / frames_at, pad=pad)
    recs = list(records("bp4d", root=str(tmp_path), split="all", subsample=False, max_skipped=0.0))
    assert len(recs) == 6
    assert {(r["labels"]["subject"], r["labels"]["frame"]): r["labels"]["aus"] for r in recs} == truth
    assert {(r["labels"]["subject"], r["labels"]["frame"]): r["image"] for r in recs} == images


def test_bp4d_per_subject_zips_are_named_with_their_unzip_command(tmp_path):
    _bp4d_labels(tmp_path)
    staging = tmp_path / "staging"
    _bp4d_frames(staging)
    (tmp_path / "2D+3D").mkdir()
    for subject in ("F001", "M002"):  # the release's per-subject zips, members F001/T1/2440.jpg ...
        with zipfile.ZipFile(tmp_path / "2D+3D" / f"{subject}.zip", "w") as z:
            for path in sorted((staging / subject).rglob("*.jpg")):
                z.write(path, path.relative_to(staging).as_posix())
    with pytest.raises(FileNotFoundError, match=r"unzip -q '.*2D\+3D/F001\.zip' -d '.*2D\+3D'"):
        records("bp4d", root=str(tmp_path), split="all")
    with zipfile.ZipFile(tmp_path / "2D+3D/F001.zip") as z:  # the user follows the message for F001 only
        z.extractall(tmp_path / "2D+3D")
    with pytest.raises(FileNotFoundError, match=r"still in archives.*M002\.zip"):
        records("bp4d", root=str(tmp_path), split="all")
    with zipfile.ZipFile(tmp_path / "2D+3D/M002.zip") as z:
        z.extractall(tmp_path / "2D+3D")
    assert len(list(records("bp4d", root=str(tmp_path), split="all", subsample=False))) == 6


def test_bp4d_two_frame_folders_are_refused(tmp_path):
    _bp4d_labels(tmp_path)
    _bp4d_frames(tmp_path / "2D+3D")
    _bp4d_frames(tmp_path / "img")
    with pytest.raises(ValueError, match=r"2 candidate frame folder.*2D\+3D.*img.*keep one"):
        records("bp4d", root=str(tmp_path), split="all")


# ---------------------------------------------------------------- DISFA frame numbering


def _disfa_labels(root: Path, frames: int = 12, subject: str = "SN001") -> dict[int, list[int]]:
    """The release's intensity files, frames counted from 1; AU 12 at intensity 3 on frames 4 and 9 only."""
    for au in DISFA_AUS:
        lines = [f"{f},{3 if au == 12 and f in (4, 9) else 0}" for f in range(1, frames + 1)]
        write_text(root / "ActionUnit_Labels" / subject / f"{subject}_au{au}.txt", "\n".join(lines) + "\n")
    return {f: [12] if f in (4, 9) else [] for f in range(1, frames + 1)}


def test_disfa_frames_numbered_from_zero_are_paired_not_shifted(tmp_path, caplog):
    truth = _disfa_labels(tmp_path)
    images = {n: tiny_image(tmp_path / "img/SN001" / f"{n}.png", n, "PNG") for n in range(12)}  # ME-GraphAU: 0.png ..
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        recs = list(records("disfa", root=str(tmp_path), split="all", subsample=False, max_skipped=0.0))
    assert len(recs) == 12 and "numbered from 0" in caplog.text
    by_frame = {r["labels"]["frame"]: r for r in recs}
    assert {f: r["labels"]["aus"] for f, r in by_frame.items()} == truth  # label frames 1..12, never renumbered
    assert by_frame[4]["image"] == images[3] and by_frame[1]["image"] == images[0]  # image N shows frame N+1
    forced = list(records("disfa", root=str(tmp_path), split="all", subsample=False, frame_base=1))
    assert len(forced) == 11 and {r["labels"]["frame"]: r["image"] for r in forced}[4] == images[4]


def test_disfa_ambiguous_numbering_is_refused_until_frame_base_decides(tmp_path):
    _disfa_labels(tmp_path)
    images = {n: tiny_image(tmp_path / "Images_LeftCamera/SN001" / f"{n:05d}.jpg", n) for n in range(13)}  # 0..12
    with pytest.raises(FrameNumberingError, match=r"from 0 or from 1.*--frame-base 1.*--frame-base 0"):
        list(records("disfa", root=str(tmp_path), split="all"))
    zero = {r["labels"]["frame"]: r["image"] for r in records("disfa", root=str(tmp_path), split="all",
                                                             subsample=False, frame_base=0)}
    one = {r["labels"]["frame"]: r["image"] for r in records("disfa", root=str(tmp_path), split="all",
                                                            subsample=False, frame_base=1)}
    assert zero[4] == images[3] and one[4] == images[4] and len(zero) == len(one) == 12


def test_detect_offset_rules():
    labels = list(range(1, 101))
    assert detect_offset(labels, set(range(1, 101))) == 0  # numbered like the labels
    assert detect_offset(labels, set(range(0, 100))) == 1  # numbered from 0
    assert detect_offset(labels, set(range(0, 100)) - set(range(40, 60))) == 1  # JAA-Net drops failed frames
    assert detect_offset(labels, set(range(0, 101))) is None  # one extra frame: cannot tell
    assert detect_offset(labels, set(range(1, 100))) is None  # 1..99 fits both readings
    assert detect_offset(labels, set(range(0, 100, 10))) == 1  # every 10th frame, from 0


def test_disfa_jaanet_and_extraction_script_layouts(tmp_path):
    truth = _disfa_labels(tmp_path / "jaanet")
    kept = [n for n in range(12) if n not in (5, 6)]  # JAA-Net's lists leave out frames without a face
    for n in kept:
        tiny_image(tmp_path / "jaanet/SN001" / f"{n}.jpg", n)
    recs = list(records("disfa", root=str(tmp_path / "jaanet"), split="all", subsample=False, max_skipped=0.5))
    assert {r["labels"]["frame"]: r["labels"]["aus"] for r in recs} == {n + 1: truth[n + 1] for n in kept}

    truth = _disfa_labels(tmp_path / "script")
    for n in range(1, 13):
        tiny_image(tmp_path / "script/images/LeftVideoSN001_comp" / f"LeftVideoSN001_comp_{n:04d}.png", n, "PNG")
        tiny_image(tmp_path / "script/images/RightVideoSN001_comp" / f"RightVideoSN001_comp_{n:04d}.png", 99, "PNG")
    recs = list(records("disfa", root=str(tmp_path / "script"), split="all", subsample=False, max_skipped=0.0))
    assert {r["labels"]["frame"]: r["labels"]["aus"] for r in recs} == truth
    assert all(r["image"][:4] == b"\x89PNG" for r in recs)


def test_disfa_videos_without_frames_name_the_ffmpeg_command(tmp_path):
    _disfa_labels(tmp_path)
    write_text(tmp_path / "Videos_LeftCamera/LeftVideoSN001_comp.avi", "not really a video")
    with pytest.raises(FileNotFoundError, match=r"no extracted frames.*ffmpeg -i .*LeftVideoSN001_comp\.avi "
                                                r"-start_number 1"):
        records("disfa", root=str(tmp_path), split="all")


def test_gft_img_folder_numbered_from_zero(tmp_path):
    header = "frame,AU1,AU2,AU4,AU6,AU10,AU12,AU14,AU15,AU23,AU24"
    rows = [f"{f}," + ",".join("1" if au == "AU12" and f == 3 else "0" for au in header.split(",")[1:])
            for f in range(1, 8)]
    write_text(tmp_path / "GFT/AU_OCC/001A.csv", "\n".join([header, *rows]) + "\n")
    images = {n: tiny_image(tmp_path / "GFT/img/001A" / f"{n}.jpg", n) for n in range(7)}
    recs = {r["labels"]["frame"]: r for r in records("gft", root=str(tmp_path), split="all", subsample=False)}
    assert sorted(recs) == list(range(1, 8)) and recs[3]["labels"]["aus"] == [12] and recs[3]["image"] == images[2]


# ---------------------------------------------------------------- EmotioNet


EMOTIONET_AUS = (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26, 43)


def _emotionet_rows(urls: list[str], values: list[dict[int, int]]) -> list[list[str]]:
    """The release's table: quoted headers ('AU 1'), quoted URL cells, 999 for unknown."""
    header = ["URL", "URL orig", *(f"'AU {au}'" for au in EMOTIONET_AUS)]
    return [header] + [[f"'{u}'", f"'{u}'", *(str(v.get(au, 0)) for au in EMOTIONET_AUS)]
                       for u, v in zip(urls, values, strict=True)]


EMOTIONET_URLS = ["http://a.example/x/N_0001.jpg", "http://b.example/N_0002.jpg", "http://c.example/N_0003.jpg"]
EMOTIONET_VALUES = [{1: 1, 2: 999, 12: 1, 43: 1}, dict.fromkeys(EMOTIONET_AUS, 999), {25: 1, 26: 1, 4: 999}]


def test_emotionet_release_csv_with_quoted_headers_and_urls(tmp_path):
    # py-feat's EmotioNet tutorial: labels/EmotioNet_FACS_aws_2020_24600.csv and the images in imgs/
    rows = _emotionet_rows(EMOTIONET_URLS, EMOTIONET_VALUES)
    write_text(tmp_path / "labels/EmotioNet_FACS_aws_2020_24600.csv", "\n".join(",".join(r) for r in rows) + "\n")
    images = {n: tiny_image(tmp_path / "imgs" / f"N_000{n}.jpg", n) for n in (1, 3)}
    recs = list(records("emotionet", root=str(tmp_path), split="all", max_skipped=0.0))
    assert [(r["labels"]["aus"], r["labels"]["aus_unknown"]) for r in recs] == [([1, 12], [2]), ([25, 26], [4])]
    assert [r["image"] for r in recs] == [images[1], images[3]]  # the quotes around the URLs are gone
    assert recs[0]["key"].startswith("emotionet-N_0001-")


def test_emotionet_release_xlsx_every_sheet(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    first = book.active
    for row in _emotionet_rows(EMOTIONET_URLS[:2], EMOTIONET_VALUES[:2]):
        first.append([int(c) if c.isdigit() else c for c in row])  # numbers stored as numbers, as Excel does
    second = book.create_sheet("more")
    for row in _emotionet_rows(EMOTIONET_URLS[2:], EMOTIONET_VALUES[2:]):
        second.append(row)
    book.save(tmp_path / "EmotioNet_FACS_aws_2020_24600.xlsx")
    for n in (1, 3):
        tiny_image(tmp_path / "images" / f"N_000{n}.jpg", n)
    recs = list(records("emotionet", root=str(tmp_path), split="all", max_skipped=0.0))
    assert [r["labels"]["aus"] for r in recs] == [[1, 12], [25, 26]]


def test_emotionet_without_the_release_table_names_it(tmp_path):
    write_text(tmp_path / "notes.csv", "a,b\n")
    with pytest.raises(FileNotFoundError, match=r"EmotioNet_FACS_aws_2020_24600\.csv or \.xlsx"):
        records("emotionet", root=str(tmp_path), split="all")


# ---------------------------------------------------------------- AffectNet


AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal")


def _affectnet_lists(root: Path, train: dict[str, int], test: dict[str, int]) -> None:
    for name, rows in (("training.csv", train), ("validation.csv", test)):
        lines = [AFFECTNET_HEADER, *(f'{n},1,1,9,9,"1.0;2.0",{c},0.1,0.2' for n, c in rows.items())]
        write_text(root / "Manually_Annotated_file_lists" / name, "\n".join(lines) + "\n")


@pytest.mark.parametrize("images_at", ["Manually_Annotated/Manually_Annotated_Images",
                                       "Manually_Annotated_compressed/Manually_Annotated/Manually_Annotated_Images"])
def test_affectnet_nested_image_roots(tmp_path, images_at):
    _affectnet_lists(tmp_path, {"1/a.jpg": 1, "2/b.jpg": 6, "2/c.jpg": 9}, {"3/d.jpg": 7})
    for name in ("1/a.jpg", "2/b.jpg", "3/d.jpg"):
        tiny_image(tmp_path / images_at / name)
    train = list(records("affectnet", root=str(tmp_path), split="train", max_skipped=0.0))
    assert _labels(train, "emotions") == {"affectnet-1-a": ["happiness"], "affectnet-2-b": ["anger"]}
    assert _labels(list(records("affectnet", root=str(tmp_path), split="test")), "emotions") == {
        "affectnet-3-d": ["contempt"]}


def test_affectnet_later_release_train_set_val_set(tmp_path):
    for folder, codes in (("train_set", {0: "3", 1: "0", 2: "9"}), ("val_set", {0: "5"})):
        for image_id, code in codes.items():
            tiny_image(tmp_path / folder / "images" / f"{image_id}.jpg", image_id)
            (tmp_path / folder / "annotations").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / folder / "annotations" / f"{image_id}_exp.npy", np.array(code))
    train = list(records("affectnet", root=str(tmp_path), split="train", max_skipped=0.0))
    assert _labels(train, "emotions") == {"affectnet-train_set-0": ["surprise"], "affectnet-train_set-1": ["neutral"]}
    test = list(records("affectnet", root=str(tmp_path), split="test"))
    assert _labels(test, "emotions") == {"affectnet-val_set-0": ["disgust"]}


def test_affectnet_one_folder_per_code(tmp_path):
    # DAN's utils/convert_affectnet.py copies every image into {train,val}/<label>/
    images = {("train", 1, "a"): 1, ("train", 6, "b"): 2, ("val", 0, "c"): 3}
    for (split, code, name), shade in images.items():
        tiny_image(tmp_path / split / str(code) / f"{name}.jpg", shade)
    assert _labels(list(records("affectnet", root=str(tmp_path), split="train")), "emotions") == {
        "affectnet-train-1-a": ["happiness"], "affectnet-train-6-b": ["anger"]}
    assert _labels(list(records("affectnet", root=str(tmp_path), split="test")), "emotions") == {
        "affectnet-val-0-c": ["neutral"]}


def test_affectnet_images_still_in_their_archive(tmp_path):
    _affectnet_lists(tmp_path, {"1/a.jpg": 1}, {"3/d.jpg": 7})
    with tarfile.open(tmp_path / "Manually_Annotated.tar", "w"):
        pass
    with pytest.raises(FileNotFoundError, match=r"no Manually_Annotated_Images folder.*Manually_Annotated\.tar: "
                                                r"unpack them first, e\.g\. mkdir -p .* && tar -xf"):
        records("affectnet", root=str(tmp_path), split="train")


# ---------------------------------------------------------------- RAF-DB


@pytest.mark.parametrize("part_at, images_at", [
    ("basic/basic", "Image/aligned"),  # the download's zip unpacked into a folder of the same name
    ("RAF/RAF/basic", "Image/Image/aligned"),  # CD-FER-Benchmark's Dataset/RAF/RAF/basic; the image zip nested too
    ("raf-basic", "Image/aligned"),  # DAN's datasets/raf-basic
])
def test_rafdb_nested_downloads(tmp_path, part_at, images_at):
    labels = {"train_00001.jpg": 4, "train_00002.jpg": 7, "test_0001.jpg": 1}
    write_text(tmp_path / part_at / "EmoLabel/list_patition_label.txt", "".join(f"{n} {c}\n" for n, c in labels.items()))
    for name in labels:
        tiny_image(tmp_path / part_at / images_at / name.replace(".jpg", "_aligned.jpg"))
    recs = list(records("rafdb", root=str(tmp_path), split="all", max_skipped=0.0))
    assert _labels(recs, "emotions") == {"rafdb_basic-train_00001": ["happiness"],
                                         "rafdb_basic-train_00002": ["neutral"], "rafdb_basic-test_0001": ["surprise"]}


def test_rafdb_compound_nested_beside_basic_and_zipped_images(tmp_path):
    for part, name, code in (("basic", "train_00001.jpg", 5), ("compound", "train_0001.jpg", 8)):
        write_text(tmp_path / "RAF-DB" / part / part / "EmoLabel/list_patition_label.txt", f"{name} {code}\n")
    tiny_image(tmp_path / "RAF-DB/compound/compound/Image/aligned/train_0001_aligned.jpg")
    compound = list(records("rafdb_compound", root=str(tmp_path), split="all"))
    assert [(r["labels"]["emotions"], r["labels"]["compound"]) for r in compound] == [
        (["fear", "surprise"], "fearfully surprised")]
    (tmp_path / "RAF-DB/basic/basic/Image").mkdir(parents=True)  # the release's Image/aligned.zip, not unpacked
    with zipfile.ZipFile(tmp_path / "RAF-DB/basic/basic/Image/aligned.zip", "w") as z:
        z.writestr("aligned/train_00001_aligned.jpg", b"")
    with pytest.raises(FileNotFoundError, match=r"unzip -q '.*basic/Image/aligned\.zip' -d '.*basic/Image'"):
        records("rafdb", root=str(tmp_path), split="all")


def test_raf_au_and_faceme_in_a_nested_download(tmp_path):
    write_text(tmp_path / "RAF-AU/RAF-AU/RAFAU_label.txt", "0001.jpg 1+L4+R12\n")
    tiny_image(tmp_path / "RAF-AU/RAF-AU/aligned/0001_aligned.jpg")
    assert _labels(list(records("raf_au", root=str(tmp_path / "RAF-AU"), split="all"))) == {"raf_au-0001": [1, 4, 12]}
    write_text(tmp_path / "FaceME/FaceME/label_names.txt", "happy\nsad\n")
    write_text(tmp_path / "FaceME/FaceME/annotations.csv",
           "image,annotator_1,annotator_2,annotator_3\na.jpg,happy,happy,\n")
    tiny_image(tmp_path / "FaceME/FaceME/images/a.jpg")
    assert _labels(list(records("faceme", root=str(tmp_path / "FaceME"))), "emotions") == {"faceme-a": ["happiness"]}


# ---------------------------------------------------------------- conversions that must fail


def test_zero_sample_conversion_exits_non_zero_without_a_manifest(tmp_path, capsys):
    # every image of the list is missing (the images sit where no reader looks): make_shards must not say "complete"
    _affectnet_lists(tmp_path / "AffectNet", {"1/a.jpg": 1, "1/b.jpg": 2}, {"3/d.jpg": 7})
    (tmp_path / "AffectNet/Manually_Annotated_Images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        tiny_image(tmp_path / "AffectNet/elsewhere" / name)
    out = tmp_path / "shards"
    code = launch_module("make_shards").main(["affectnet", "--root", str(tmp_path / "AffectNet"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "affectnet: no samples to write" in err and "1/a.jpg (missing image)" in err
    assert not (out / MANIFEST).exists() and not (out / PARTIAL_MANIFEST).exists()


def test_too_many_skipped_rows_fail_unless_allowed(tmp_path, capsys):
    labels = {f"train_{i:05d}.jpg": 4 for i in range(1, 5)}
    write_text(tmp_path / "basic/EmoLabel/list_patition_label.txt", "".join(f"{n} {c}\n" for n, c in labels.items()))
    for name in list(labels)[:3]:  # one of four images is missing: 25% > 1%
        tiny_image(tmp_path / "basic/Image/aligned" / name.replace(".jpg", "_aligned.jpg"))
    main = launch_module("make_shards").main
    assert main(["rafdb", "--root", str(tmp_path), "--out", str(tmp_path / "a"), "--samples-per-shard", "2"]) == 2
    err = capsys.readouterr().err
    assert "1 of 4 rows skipped (25.0%)" in err and "train_00004_aligned.jpg" in err and "--max-skipped 0.25" in err
    assert not (tmp_path / "a" / MANIFEST).exists() and not (tmp_path / "a" / PARTIAL_MANIFEST).exists()
    assert main(["rafdb", "--root", str(tmp_path), "--out", str(tmp_path / "a"), "--samples-per-shard", "2",
                 "--max-skipped", "0.3"]) == 0
    assert read_manifest(str(tmp_path / "a"))["total_samples"] == 3


def test_rows_left_out_by_rule_never_fail_a_conversion(tmp_path):
    # AffectNet's codes 8-10 are most of this list; they are a label rule, not bad data
    _affectnet_lists(tmp_path, {"1/a.jpg": 1, "1/b.jpg": 8, "1/c.jpg": 9, "1/d.jpg": 10}, {"3/d.jpg": 7})
    tiny_image(tmp_path / "Manually_Annotated_Images/1/a.jpg")
    recs = list(records("affectnet", root=str(tmp_path), split="train", max_skipped=0.0))
    assert _labels(recs, "emotions") == {"affectnet-1-a": ["happiness"]}
    # but a conversion that keeps nothing at all is an error
    with pytest.raises(ConversionError, match=r"no samples to write .*1 code 8 \(none\) \(by rule\)"):
        write_text(tmp_path / "Manually_Annotated_file_lists/training.csv",
               "\n".join([AFFECTNET_HEADER, '1/b.jpg,1,1,9,9,"1",8,0,0']) + "\n")
        list(records("affectnet", root=str(tmp_path), split="train", max_skipped=0.0))


def test_make_shards_disfa_frame_base_end_to_end(tmp_path, capsys):
    truth = _disfa_labels(tmp_path / "DISFA")
    _disfa_labels(tmp_path / "DISFA", subject="SN002")
    for n in range(12):  # SN001: ME-GraphAU's 0.png .. 11.png, detected
        tiny_image(tmp_path / "DISFA/img/SN001" / f"{n}.png", n, "PNG")
    for n in range(13):  # SN002: 0..12 against labels 1..12 cannot be told apart
        tiny_image(tmp_path / "DISFA/img/SN002" / f"{n}.png", n, "PNG")
    out, main = tmp_path / "shards", launch_module("make_shards").main
    args = ["disfa", "--root", str(tmp_path / "DISFA"), "--out", str(out), "--split", "all", "--no-subsample",
            "--samples-per-shard", "5"]
    assert main(args) == 2  # after SN001's shards were written
    assert "--frame-base 0 if image N shows label frame N+1" in capsys.readouterr().err
    assert not (out / MANIFEST).exists() and not (out / PARTIAL_MANIFEST).exists()
    assert main([*args, "--frame-base", "0"]) == 0  # the re-run the message asks for is not told it differs
    urls, _ = resolve_shards(str(out))
    samples = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(samples) == 24 and read_manifest(str(out))["meta"]["frame_base"] == 0
    assert {s["frame"]: s["aus"] for s in samples if s["subject"] == "SN001"} == truth


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "rafdb", "fold": 1, "folds": 3}, "apply only to the video datasets"),
    ({"source": "bp4d", "fold": 1}, "--fold and --folds go together"),
    ({"source": "bp4d", "fold": 4, "folds": 3}, "--fold must be in 1..--folds"),
    ({"source": "bp4d", "fold": 1, "folds": 3, "test_subjects": "F001"}, "choose one of"),
    ({"source": "disfa", "frame_base": 2}, "--frame-base must be 0 or 1"),
    ({"source": "bp4d", "max_skipped": 1.0}, "--max-skipped"),
])
def test_convert_request_refuses_conflicting_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvertRequest(out="x", **kwargs)
