"""RAF-DB → records: the basic part (7 classes) and the compound part (11 two-emotion classes).

Expected layout (the release's own names; ROOT may also be the part folder itself)::

    ROOT/basic/EmoLabel/list_patition_label.txt       "train_00001.jpg 5": image name, code 1-7 (the release's spelling)
    ROOT/basic/Image/aligned/train_00001_aligned.jpg  aligned faces (default), or with aligned=False:
    ROOT/basic/Image/original/train_00001.jpg
    ROOT/compound/EmoLabel/list_patition_label.txt    "train_0001.jpg 1": image name, code 1-11
    ROOT/compound/Image/aligned/train_0001_aligned.jpg

Basic codes: 1 surprise, 2 fear, 3 disgust, 4 happiness, 5 sadness, 6 anger, 7 neutral.
Compound codes: 1 happily surprised, 2 happily disgusted, 3 sadly fearful, 4 sadly angry, 5 sadly surprised,
6 sadly disgusted, 7 fearfully angry, 8 fearfully surprised, 9 angrily surprised, 10 angrily disgusted,
11 disgustedly surprised — stored as the pair of canonical emotions (``["happiness", "surprise"]``) plus the
compound's name (``compound``). Split: the official one, from the ``train_`` / ``test_`` name prefix.

Labels: ``emotions``, ``aus`` None; compound records also ``compound``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import emotion_from_code
from expblip.data.sources._common import (
    Entry,
    check_split,
    in_split,
    malformed,
    parse_int,
    record_key,
    require_file,
    require_root,
    still_image_records,
    still_labels,
    text_lines,
)

LABEL_FILE = "EmoLabel/list_patition_label.txt"  # sic: the release spells it "patition"
EXPECTED = f"ROOT/basic/{LABEL_FILE} (and/or ROOT/compound/...) with images under Image/aligned or Image/original"

# RAF-DB compound codes 1-11 → (compound name, its two canonical emotions, in the name's order).
COMPOUND: dict[int, tuple[str, tuple[str, str]]] = {
    1: ("happily surprised", ("happiness", "surprise")),
    2: ("happily disgusted", ("happiness", "disgust")),
    3: ("sadly fearful", ("sadness", "fear")),
    4: ("sadly angry", ("sadness", "anger")),
    5: ("sadly surprised", ("sadness", "surprise")),
    6: ("sadly disgusted", ("sadness", "disgust")),
    7: ("fearfully angry", ("fear", "anger")),
    8: ("fearfully surprised", ("fear", "surprise")),
    9: ("angrily surprised", ("anger", "surprise")),
    10: ("angrily disgusted", ("anger", "disgust")),
    11: ("disgustedly surprised", ("disgust", "surprise")),
}


def _part_dir(base: Path, part: str) -> Path:
    """ROOT/<part>, or ROOT itself when it already is the part folder (holds EmoLabel/)."""
    nested = base / part
    return nested if nested.is_dir() or not (base / "EmoLabel").is_dir() else base


def _labels(part: str, code: int, path: Path, lineno: int) -> dict:
    if part == "basic":
        try:
            return still_labels("rafdb_basic", None, [emotion_from_code("rafdb_basic", code)])
        except ValueError as exn:
            raise malformed(path, lineno, str(exn)) from None
    if code not in COMPOUND:
        raise malformed(path, lineno, f"unknown compound code {code}: valid codes are 1..{len(COMPOUND)}")
    name, pair = COMPOUND[code]
    return still_labels("rafdb_compound", None, list(pair), compound=name)


def _image(folder: Path, name: str, aligned: bool) -> Path:
    if aligned:
        return folder / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg"
    return folder / "Image" / "original" / name


def _entries(folder: Path, path: Path, part: str, split: str, aligned: bool) -> Iterator[Entry]:
    for lineno, text in text_lines(path):
        fields = text.split()
        if len(fields) != 2:
            raise malformed(path, lineno, f"expected '<image name> <code>', got {text!r}")
        name, code = fields[0], parse_int(fields[1], path, lineno, "emotion code")
        if not name.startswith(("train_", "test_")):
            raise malformed(path, lineno, f"image name {name!r} does not start with train_ or test_")
        labels = _labels(part, code, path, lineno)
        if in_split(split, name.startswith("test_")):
            yield record_key(f"rafdb_{part}", Path(name).stem), _image(folder, name, aligned), labels


def _records(part: str, root: str, split: str, caption: CaptionConfig | None, aligned: bool) -> Iterator[dict]:
    check_split(split, f"rafdb_{part}")
    folder = _part_dir(require_root(root, f"rafdb_{part}", EXPECTED), part)
    path = require_file(folder / LABEL_FILE, f"rafdb_{part}", "lines '<image name> <code>', e.g. 'train_00001.jpg 5'")
    entries = _entries(folder, path, part, split, aligned)
    return still_image_records(f"rafdb_{part}", entries, caption or CaptionConfig(style="emotion"))


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            aligned: bool = True, **_: object) -> Iterator[dict]:
    """RAF-DB basic (7 classes) as records; official train/test split."""
    return _records("basic", root, split, caption, aligned)


def compound_records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True,
                     *, aligned: bool = True, **_: object) -> Iterator[dict]:
    """RAF-DB compound (11 two-emotion classes) as records; official train/test split."""
    return _records("compound", root, split, caption, aligned)
