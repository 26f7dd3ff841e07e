"""AffectNet (manually annotated part) → records (8 classes, official codes 0-7; codes 8-10 left out).

Layouts read (docs/datasets.md cites the public readers)::

    ROOT/Manually_Annotated_file_lists/training.csv    → split "train" (the CSVs may also sit in ROOT, or in any
    ROOT/Manually_Annotated_file_lists/validation.csv  → split "test"   folder up to two levels down)
    ROOT/Manually_Annotated_Images/689/737db2….jpg     by subDirectory_filePath; the tar of the release unpacks to
    ROOT/Manually_Annotated/Manually_Annotated_Images/ one level deeper, and the compressed release deeper still:
                                                        any Manually_Annotated_Images folder up to 3 levels down

    ROOT/train_set/images/0.jpg + ROOT/train_set/annotations/0_exp.npy   the later release: "train";
    ROOT/val_set/...                                                       "val_set" → "test"
    ROOT/train/3/<image>.jpg, ROOT/val/3/...   one folder per code (DAN's utils/convert_affectnet.py): "val" → "test"

CSV columns: ``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,
arousal`` (the landmarks cell is a quoted ``;``-separated list). A header row is optional (some copies of
validation.csv have none; then those positions are assumed). ``expression`` codes: 0 neutral, 1 happiness,
2 sadness, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt; 8 none, 9 uncertain, 10 non-face are left out by rule
(counted); any other value raises. In the later release each image's ``<id>_exp.npy`` holds that code.

Labels: ``emotions`` ([one canonical name]), ``aus`` None.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import emotion_from_code
from expblip.data.sources._common import (
    DOCS,
    Entry,
    Skips,
    check_split,
    csv_rows,
    find_dirs,
    malformed,
    one_dir,
    parse_int,
    record_key,
    require_root,
    still_image_records,
    still_labels,
)

DATASET = "affectnet"
FILES = {"train": "training.csv", "test": "validation.csv"}
SETS = {"train": "train_set", "test": "val_set"}  # the later release's folders
CLASS_SETS = {"train": "train", "test": "val"}  # one folder per code (DAN's convert_affectnet.py)
LIST_DIR, IMAGE_DIR = "Manually_Annotated_file_lists", "Manually_Annotated_Images"
EXPECTED = (f"ROOT/{LIST_DIR}/training.csv, validation.csv and ROOT/{IMAGE_DIR}/<subDirectory_filePath> "
            "(or the later release's train_set/ and val_set/)")
PATH_COLUMN, EXPRESSION_COLUMN = "subDirectory_filePath", "expression"
DROPPED = {8: "none", 9: "uncertain", 10: "non-face"}


def _label_file(base: Path, name: str) -> Path:
    found = find_dirs(base, lambda p: (p / name).is_file(), 2)
    if len(found) > 1:
        raise ValueError(f"{DATASET}: {len(found)} copies of {name}: {', '.join(str(p / name) for p in found)}; "
                         "keep one")
    if not found:
        raise FileNotFoundError(f"{DATASET}: no {name} in {base} or two levels down; expected the official {name} "
                                f"list with subDirectory_filePath and expression columns ({EXPECTED}) ({DOCS})")
    return found[0] / name


def _code_label(code: int, path: Path, lineno: int) -> dict:
    try:
        emotion = emotion_from_code(DATASET, code)
    except ValueError as exn:
        raise malformed(path, lineno, f"{exn} (8-10 are left out)") from None
    return still_labels(DATASET, None, [emotion])


def _entries(image_dir: Path, path: Path, skips: Skips) -> Iterator[Entry]:
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
            skips.drop(f"code {code} ({DROPPED[code]})", f"{path.name} line {lineno}")
            continue
        folder, _, file = name.rpartition("/")
        yield record_key(DATASET, folder, Path(file).stem), image_dir / name, _code_label(code, path, lineno)


def _npy_code(path: Path) -> int:
    import numpy as np

    try:
        return int(np.load(path).item())
    except (ValueError, TypeError, OSError) as exn:
        raise ValueError(f"{path}: expected the expression code (0-10) as a one-element array, got: {exn}") from None


def _set_entries(folder: Path, skips: Skips) -> Iterator[Entry]:
    """Entries of the later release's ``train_set`` / ``val_set``: images/<id>.jpg + annotations/<id>_exp.npy."""
    for npy in sorted((folder / "annotations").glob("*_exp.npy")):
        image_id = npy.name[: -len("_exp.npy")]
        code = _npy_code(npy)
        if code in DROPPED:
            skips.drop(f"code {code} ({DROPPED[code]})", str(npy))
            continue
        yield (record_key(DATASET, folder.name, image_id), folder / "images" / f"{image_id}.jpg",
               _code_label(code, npy, 1))


def _later_release(base: Path, splits: tuple[str, ...]) -> list[Path] | None:
    """The train_set / val_set folders of the later release, or None when ROOT is not laid out so."""
    found = {s: find_dirs(base, lambda p, s=s: p.name == SETS[s] and (p / "annotations").is_dir(), 2) for s in splits}
    if not any(found.values()):
        return None
    for s, folders in found.items():
        if len(folders) != 1:
            raise FileNotFoundError(f"{DATASET}: expected one {SETS[s]}/ folder with images/ and annotations/ under "
                                    f"{base}, found {len(folders)} ({DOCS})")
    return [found[s][0] for s in splits]


def _class_folders(base: Path, splits: tuple[str, ...]) -> list[Path] | None:
    """ROOT/train and ROOT/val when they hold one folder per expression code (0-7), else None."""
    folders = [base / CLASS_SETS[s] for s in splits]
    if not all(f.is_dir() and any(d.name.isdigit() for d in f.iterdir() if d.is_dir()) for f in folders):
        return None
    return folders


def _class_entries(folder: Path, skips: Skips) -> Iterator[Entry]:
    for class_dir in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name):
        if not class_dir.name.isdigit():
            raise ValueError(f"{class_dir}: expected one folder per expression code 0-7 in {folder}")
        code = int(class_dir.name)
        for image in sorted(class_dir.iterdir()):
            if code in DROPPED:
                skips.drop(f"code {code} ({DROPPED[code]})", str(image))
                continue
            yield (record_key(DATASET, folder.name, class_dir.name, image.stem), image,
                   _code_label(code, class_dir, 1))


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """AffectNet's manually annotated images as records; "train" is training.csv, "test" validation.csv."""
    check_split(split, DATASET)
    base = require_root(root, DATASET, EXPECTED)
    splits = ("train", "test") if split == "all" else (split,)
    skips = Skips(DATASET, max_skipped)
    sets, classes = _later_release(base, splits), _class_folders(base, splits)
    if sets is not None:
        entries = (entry for folder in sets for entry in _set_entries(folder, skips))
    elif classes is not None:
        entries = (entry for folder in classes for entry in _class_entries(folder, skips))
    else:
        files = [_label_file(base, FILES[s]) for s in splits]
        image_dir = one_dir(base, DATASET, lambda p: p.name == IMAGE_DIR, f"{IMAGE_DIR} folder", 3,
                            f"ROOT/{IMAGE_DIR}/<subDirectory_filePath>")
        entries = (entry for path in files for entry in _entries(image_dir, path, skips))
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="emotion"), skips)
