"""Bring your own faces: a label table (CSV, TSV, XLSX, JSONL, parquet) → records → shards, ``make_shards --check``
and the refusals, each on a few rows and 8-px images in tmp_path."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import fsspec
import pytest
from conftest import launch_module, tiny_image, write_text

from expblip.data.captions import NO_AU_CAPTION
from expblip.data.shards import MANIFEST, read_manifest, resolve_shards
from expblip.data.sources import records
from expblip.data.sources.table import LabelError

ROWS = [  # image, aus, emotion, subject, frame
    {"image": "faces/a.jpg", "aus": "1,2,12", "emotion": "happy", "subject": "S1", "frame": 3},
    {"image": "faces/b.png", "aus": "none", "emotion": "neutral", "subject": "S1", "frame": 4},
    {"image": "faces/c.jpg", "aus": "", "emotion": "Sad", "subject": "S2", "frame": 5},
    {"image": "faces/d.jpg", "aus": "AU4 AU15", "emotion": "", "subject": "S2", "frame": 6},
]


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    """tmp_path with faces/a.jpg, b.png, c.jpg, d.jpg."""
    for i, name in enumerate(("a.jpg", "b.png", "c.jpg", "d.jpg")):
        tiny_image(tmp_path / "faces" / name, shade=i, fmt="PNG" if name.endswith("png") else "JPEG")
    return tmp_path


def write_table(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a table of the type ``path``'s extension names (empty strings: empty cells)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, delimiter="," if path.suffix == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if v != ""}) + "\n" for row in rows))
    elif path.suffix == ".xlsx":
        from openpyxl import Workbook

        book = Workbook()
        book.active.append(columns)
        for row in rows:
            book.active.append([row.get(c) if row.get(c) != "" else None for c in columns])
        book.save(path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{c: row.get(c) or None for c in columns} for row in rows]), path)
    return path


def convert(table: Path, **options) -> list[dict]:
    return list(records("table", table=str(table), **{"max_skipped": 0.5, **options}))


def summary(recs: list[dict]) -> list[tuple]:
    return [(r["key"], r["labels"], r["captions"], r["image"]) for r in recs]


def make_shards(argv: list[str]) -> int:
    return launch_module("make_shards").main(argv)


# ---------------------------------------------------------------- formats and labels


def test_five_file_types_give_the_same_records(faces):
    tables = {ext: write_table(faces / f"labels.{ext}", ROWS) for ext in ("csv", "tsv", "xlsx", "jsonl", "parquet")}
    jsonl_lists = [dict(r, aus=[1, 2, 12]) if r["aus"] == "1,2,12" else r for r in ROWS]  # a real JSON list works too
    write_table(tables["jsonl"], jsonl_lists)
    got = {ext: summary(convert(path)) for ext, path in tables.items()}
    assert all(got[ext] == got["csv"] for ext in got), {ext: got[ext][0][:2] for ext in got}
    recs = convert(tables["csv"])
    assert [r["key"] for r in recs] == ["table-faces_a", "table-faces_b", "table-faces_c", "table-faces_d"]
    a, b, c, d = (r["labels"] for r in recs)
    assert (a["aus"], a["emotions"], a["subject"], a["frame"]) == ([1, 2, 12], ["happiness"], "S1", 3)
    assert (b["aus"], b["emotions"]) == ([], ["neutral"])  # "none": labelled, no AU active
    assert (c["aus"], c["emotions"]) == (None, ["sadness"])  # empty: not labelled
    assert (d["aus"], d["emotions"]) == ([4, 15], None)
    assert recs[0]["image"] == (faces / "faces/a.jpg").read_bytes()  # the file's own bytes
    assert recs[0]["captions"] == ["It is a people who raises inner eyebrow, raises outer eyebrow and pulls lip "
                                   "corner. The face shows happiness."]
    assert recs[1]["captions"] == [f"{NO_AU_CAPTION} The face shows a neutral expression."]
    assert recs[2]["captions"] == ["The face shows sadness."]


def test_au_list_per_au_columns_and_intensities_agree(faces):
    listed = write_table(faces / "list.csv", [{"image": "faces/a.jpg", "aus": "1;12"}])
    per_au = write_table(faces / "per_au.csv", [{"image": "faces/a.jpg", "AU01": 1, "AU2": 0, "au_12": 1}])
    intensity = write_table(faces / "intensity.csv", [{"image": "faces/a.jpg", "AU01": 3, "AU2": 1, "au_12": 2}])
    assert convert(listed)[0]["labels"]["aus"] == [1, 12]
    assert convert(per_au)[0]["labels"]["aus"] == [1, 12]
    labels = convert(intensity, au_threshold=2)[0]["labels"]
    assert labels["aus"] == [1, 12] and labels["au_intensity"] == {"1": 3.0, "2": 1.0, "12": 2.0}
    with pytest.raises(LabelError, match=r"intensity.csv row 2: column 'AU01' = '3'.*--au-threshold"):
        convert(intensity)
    openface = write_table(faces / "openface.csv", [{"image": "faces/a.jpg", "AU01_r": 2.5, "AU01_c": 0,
                                                     "AU12_r": 0.4, "AU12_c": 1, "AU45_c": 1}])
    with pytest.raises(ValueError, match=r"'AU45_c' names AU 45.*--ignore-columns AU45_c"):
        convert(openface)
    assert convert(openface, ignore_columns="AU45_c")[0]["labels"]["aus"] == [12]  # presence (_c) by default
    assert convert(openface, ignore_columns="AU45_c", au_threshold=2)[0]["labels"]["aus"] == [1]  # _r with T


def test_emotion_codes_through_a_map(faces):
    table = write_table(faces / "codes.csv", [{"image": "faces/a.jpg", "emotion": 1},
                                              {"image": "faces/b.png", "emotion": "0"}])
    lines = write_text(faces / "map.txt", "# code,name\n0,neutral\n1,happy\n")
    as_json = write_text(faces / "map.json", json.dumps({"0": "neutral", "1": "happiness"}))
    for spec in (lines, as_json, "affectnet"):  # affectnet: 0 neutral, 1 happiness
        assert [r["labels"]["emotions"] for r in convert(table, emotion_map=str(spec))] == [["happiness"],
                                                                                            ["neutral"]]
    with pytest.raises(LabelError, match=r"codes.csv row 2: emotion '1'.*is a code: pass --emotion-map"):
        convert(table)
    short = write_text(faces / "short.txt", "0,neutral\n")
    with pytest.raises(LabelError, match=r"emotion code 1 .*not in --emotion-map \(codes \['0'\]\)"):
        convert(table, emotion_map=str(short))
    wrong = write_text(faces / "wrong.txt", "0,neutral\n1,joyful\n")
    with pytest.raises(ValueError, match=r"code 1 maps to 'joyful', not an emotion"):
        convert(table, emotion_map=str(wrong))


def test_given_captions_are_kept_and_missing_ones_come_from_labels(faces):
    table = write_table(faces / "captions.csv", [
        {"image": "faces/a.jpg", "aus": "12", "caption": "A wide smile.", "caption_2": "Smiling."},
        {"image": "faces/b.png", "aus": "12", "caption": "", "caption_2": ""},
        {"image": "faces/c.jpg", "aus": "", "caption": "Only a caption.", "caption_2": ""},
    ])
    auto = convert(table)
    assert [r["captions"] for r in auto] == [["A wide smile."], ["It is a people who pulls lip corner."],
                                             ["Only a caption."]]
    assert auto[0]["labels"]["aus"] == [12] and auto[2]["labels"]["aus"] is None  # labels kept beside captions
    both = convert(table, caption_column="caption,caption_2")
    assert both[0]["captions"] == ["A wide smile.", "Smiling."]


def test_images_by_url_and_split_column(faces):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/own/a.jpg", (faces / "faces/a.jpg").read_bytes())
    table = write_table(faces / "urls.csv", [{"image": "memory://own/a.jpg", "aus": "1", "split": "train"},
                                             {"image": "faces/b.png", "aus": "2", "split": "validation"}])
    train, test = convert(table), convert(table, split="test")
    assert [r["image"] for r in train] == [(faces / "faces/a.jpg").read_bytes()]
    assert [r["labels"]["aus"] for r in test] == [[2]]  # validation rows belong to the test split
    fs.rm("/own", recursive=True)


# ---------------------------------------------------------------- bad data: skipped and counted


def test_missing_and_truncated_images_are_skipped_and_counted(faces, caplog):
    (faces / "faces/broken.jpg").write_bytes((faces / "faces/a.jpg").read_bytes()[:60])  # cut mid-file
    rows = [*ROWS, {"image": "faces/gone.jpg", "aus": "1"}, {"image": "faces/broken.jpg", "aus": "1"},
            {"image": "faces/a.jpg", "aus": "", "emotion": ""}]
    table = write_table(faces / "bad.csv", rows)
    with caplog.at_level(logging.WARNING, logger="expblip.data.sources"):
        assert len(convert(table, max_skipped=0.5)) == 4
    assert "1 missing image, 1 no label, 1 unreadable image" in caplog.text
    assert make_shards(["table", "--table", str(table), "--out", str(faces / "out")]) == 2  # 3 of 7 > 1%
    assert not (faces / "out" / MANIFEST).exists()
    out = faces / "ok"
    assert make_shards(["table", "--table", str(table), "--out", str(out), "--max-skipped", "0.5"]) == 0
    assert read_manifest(str(out))["total_samples"] == 4 and len(resolve_shards(str(out))[0]) == 1


# ---------------------------------------------------------------- --check


def test_check_counts_shows_examples_and_writes_nothing(faces, capsys):
    rows = [*ROWS, {"image": "faces/gone.jpg", "aus": "1"}, {"image": "faces/a.jpg", "aus": "1,99"},
            {"image": "faces/b.png", "emotion": "joyful"}, {"image": "faces/c.jpg", "aus": "", "emotion": ""}]
    table = write_table(faces / "mixed.csv", rows)
    assert make_shards(["table", "--table", str(table), "--check"]) == 2
    out, err = capsys.readouterr()
    assert "4 usable of 8 rows read" in out
    for line in ("missing image: 1", "unreadable image: 0", "unknown AU number: 1", "unknown emotion: 1",
                 "no label: 1"):
        assert f"  {line}\n" in out
    examples = [line for line in out.splitlines() if line.startswith("  example")]
    assert len(examples) == 3 and "key=table-faces_a" in examples[0] and '"aus": [1, 2, 12]' in examples[0]
    assert "caption='It is a people who raises inner eyebrow" in examples[0]
    assert err.strip().splitlines()[-1].startswith("error: table: the conversion would stop at a bad label")
    assert "mixed.csv row 7: AU 99 in column 'aus'" in err
    assert not any(p.name != "faces" for p in faces.iterdir() if p.is_dir())  # no output folder

    assert make_shards(["table", "--table", str(table), "--check", "3"]) == 0  # the first 3 rows are fine
    out = capsys.readouterr().out
    assert "(first 3 rows, nothing written): 3 usable of 3 rows read" in out


def test_check_works_for_other_sources(capsys):
    assert make_shards(["synthetic", "--samples", "5", "--check", "2"]) == 0
    out = capsys.readouterr().out
    assert "check of synthetic (first 2 rows, nothing written): 2 usable of 2 rows read" in out
    assert out.count("  example") == 2 and '"dataset": "synthetic"' in out


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


@pytest.mark.parametrize("case, expected", [
    ("misnamed", r"error: table \S+misnamed.csv: no column 'emotion' \(--emotion-column\); the columns are "
                 r"\['image', 'emotoin'\]"),
    ("au99", r"error: \S+au99.csv row 2: AU 99 in column 'aus' is not an AU expblip knows .*remove 99"),
    ("emotion", r"error: \S+emotion.csv row 2: unknown emotion 'joyful' in column 'emotion'; use one of"),
    ("missing", r"error: table \S+missing.csv does not exist; pass --table"),
    ("empty", r"error: table \S+empty.csv is empty: expected a header row"),
])
def test_bad_tables_fail_with_one_line(faces, capsys, case, expected):
    tables = {"misnamed": ("image,emotoin\nfaces/a.jpg,happy\n", ["--emotion-column", "emotion"]),
              "au99": ('image,aus\nfaces/a.jpg,"1,99"\n', []),
              "emotion": ("image,emotion\nfaces/a.jpg,joyful\n", []),
              "empty": ("", [])}
    text, extra = tables.get(case, (None, []))
    path = faces / f"{case}.csv"
    if text is not None:
        path.write_text(text)
    out = faces / "out"
    assert make_shards(["table", "--table", str(path), "--out", str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(expected, errors[0]), errors
    assert not (out / MANIFEST).exists()


def test_unnamed_labels_name_the_columns_found(faces, capsys):
    path = write_text(faces / "nolabels.csv", "image,emotoin\nfaces/a.jpg,happy\n")
    assert make_shards(["table", "--table", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "no label column" in err and "['image', 'emotoin']" in err and "--emotion-column" in err
