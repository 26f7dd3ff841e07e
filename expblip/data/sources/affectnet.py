"""AffectNet (manually annotated part) → records (8 classes, official codes 0-7; codes 8-10 dropped).

Expected layout (the release's own names; the two CSVs may also sit directly in ROOT)::

    ROOT/Manually_Annotated_file_lists/training.csv      → split "train"
    ROOT/Manually_Annotated_file_lists/validation.csv    → split "test" (the paper's 4,000-image test set)
    ROOT/Manually_Annotated_Images/<subDirectory_filePath>   e.g. 689/737db2483489148d783ef278f43f486c0a97e1.jpg

CSV columns: ``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,
arousal`` (the landmarks cell is a quoted ``;``-separated list). A header row is optional (some copies of
validation.csv have none; then those positions are assumed). ``expression`` codes: 0 neutral, 1 happiness,
2 sadness, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt; 8 none, 9 uncertain, 10 non-face are skipped
(counted); any other value raises.

Labels: ``emotions`` ([one canonical name]), ``aus`` None.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import emotion_from_code
from expblip.data.sources._common import (
    Entry,
    Skips,
    check_split,
    csv_rows,
    malformed,
    parse_int,
    record_key,
    require_root,
    still_image_records,
    still_labels,
)

DATASET = "affectnet"
FILES = {"train": "training.csv", "test": "validation.csv"}
LIST_DIR, IMAGE_DIR = "Manually_Annotated_file_lists", "Manually_Annotated_Images"
EXPECTED = f"ROOT/{LIST_DIR}/training.csv, validation.csv and ROOT/{IMAGE_DIR}/<subDirectory_filePath>"
PATH_COLUMN, EXPRESSION_COLUMN = "subDirectory_filePath", "expression"
DROPPED = {8: "none", 9: "uncertain", 10: "non-face"}


def _label_file(base: Path, name: str) -> Path:
    for path in (base / LIST_DIR / name, base / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DATASET}: missing {base / LIST_DIR / name} (or {base / name}); expected the "
                            f"official {name} list with subDirectory_filePath and expression columns")


def _entries(base: Path, path: Path, skips: Skips) -> Iterator[Entry]:
    code_col = 6  # the official column position, for copies without a header row
    for index, (lineno, row) in enumerate(csv_rows(path)):
        if index == 0 and row[0] == PATH_COLUMN:
            if EXPRESSION_COLUMN not in row:
                raise malformed(path, lineno, f"header has no {EXPRESSION_COLUMN!r} column")
            code_col = row.index(EXPRESSION_COLUMN)
            continue
        if len(row) <= code_col:
            raise malformed(path, lineno, f"{len(row)} cells; expected the expression code in column {code_col + 1}")
        name, code = row[0], parse_int(row[code_col], path, lineno, "expression code")
        if not name:
            raise malformed(path, lineno, "empty subDirectory_filePath")
        if code in DROPPED:
            skips.add(f"code {code} ({DROPPED[code]})", f"{path.name} line {lineno}")
            continue
        try:
            emotion = emotion_from_code(DATASET, code)
        except ValueError as exn:
            raise malformed(path, lineno, f"{exn} (8-10 are dropped)") from None
        folder, _, file = name.rpartition("/")
        labels = still_labels(DATASET, None, [emotion])
        yield record_key(DATASET, folder, Path(file).stem), base / IMAGE_DIR / name, labels


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True,
            **_: object) -> Iterator[dict]:
    """AffectNet's manually annotated images as records; "train" is training.csv, "test" validation.csv."""
    check_split(split, DATASET)
    base = require_root(root, DATASET, EXPECTED)
    files = [_label_file(base, FILES[s]) for s in (("train", "test") if split == "all" else (split,))]
    skips = Skips(DATASET)
    entries = (entry for path in files for entry in _entries(base, path, skips))
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="emotion"), skips)
