"""RAF-DB → records: the basic part (7 classes) and the compound part (11 two-emotion classes).

Layouts read (the release's own names; docs/datasets.md cites the public readers)::

    ROOT/basic/EmoLabel/list_patition_label.txt       "train_00001.jpg 5": image name, code 1-7 (the release's spelling)
    ROOT/basic/Image/aligned/train_00001_aligned.jpg  aligned faces (default), or with aligned=False:
    ROOT/basic/Image/original/train_00001.jpg
    ROOT/compound/EmoLabel/list_patition_label.txt    "train_0001.jpg 1": image name, code 1-11
    ROOT/compound/Image/aligned/train_0001_aligned.jpg

The part folder is found up to three levels down, so the nested downloads (``basic/basic/...``, ``RAF/RAF/basic``)
and DAN's ``raf-basic/`` work, as does ROOT being the part folder itself; a part folder is recognised by its label
file (``EmoLabel/list_patition_label.txt`` or the file itself) and named by a path component containing ``basic``
or ``compound``. The image folder (``aligned`` or ``original``) is found up to three levels below the part folder
(``Image/aligned``, the nested ``Image/Image/aligned``, or ``aligned``); a still-zipped one is named with its unzip
command.

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
    DOCS,
    Entry,
    Skips,
    archive_hint,
    check_split,
    find_dirs,
    in_split,
    malformed,
    one_dir,
    parse_int,
    record_key,
    require_root,
    still_image_records,
    still_labels,
    text_lines,
)

LABEL_NAME = "list_patition_label.txt"  # sic: the release spells it "patition"
LABEL_FILE = f"EmoLabel/{LABEL_NAME}"
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


def _label_path(folder: Path) -> Path | None:
    for path in (folder / LABEL_FILE, folder / LABEL_NAME):
        if path.is_file():
            return path
    return None


def _names(base: Path, folder: Path) -> list[str]:
    """The path components that can name a part: below ROOT, or ROOT's own name when ROOT is the part folder."""
    return [p.lower() for p in folder.relative_to(base).parts] or [base.name.lower()]


def part_dir(base: Path, part: str) -> Path:
    """The folder of ``part`` ("basic" | "compound"): the one whose path names it, or ROOT's only part folder."""
    found = find_dirs(base, lambda p: _label_path(p) is not None, 3)
    named = [p for p in found if any(part in name for name in _names(base, p))]
    other = "compound" if part == "basic" else "basic"
    unnamed = [p for p in found if not any(other in name for name in _names(base, p))]
    chosen = named or (unnamed if len(unnamed) == 1 else [])
    if len(chosen) > 1:
        raise ValueError(f"rafdb_{part}: {len(chosen)} {part} label files under {base}: "
                         f"{', '.join(str(_label_path(p)) for p in chosen)}; keep one")
    if not chosen:
        raise FileNotFoundError(f"rafdb_{part}: no {part}/{LABEL_FILE} under {base} (searched 3 levels down); "
                                f"expected {EXPECTED}{archive_hint(base)} ({DOCS})")
    return chosen[0]


def image_dir(folder: Path, part: str, aligned: bool) -> Path:
    name = "aligned" if aligned else "original"
    return one_dir(folder, f"rafdb_{part}", lambda p: p.name == name and p != folder, f"Image/{name} folder", 3,
                   f"{folder}/Image/{name}/")


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


def _image(images: Path, name: str, aligned: bool) -> Path:
    return images / f"{Path(name).stem}_aligned.jpg" if aligned else images / name


def _entries(images: Path, path: Path, part: str, split: str, aligned: bool) -> Iterator[Entry]:
    for lineno, text in text_lines(path):
        fields = text.split()
        if len(fields) != 2:
            raise malformed(path, lineno, f"expected '<image name> <code>', got {text!r}")
        name, code = fields[0], parse_int(fields[1], path, lineno, "emotion code")
        if not name.startswith(("train_", "test_")):
            raise malformed(path, lineno, f"image name {name!r} does not start with train_ or test_")
        labels = _labels(part, code, path, lineno)
        if in_split(split, name.startswith("test_")):
            yield record_key(f"rafdb_{part}", Path(name).stem), _image(images, name, aligned), labels


def _records(part: str, root: str, split: str, caption: CaptionConfig | None, aligned: bool,
             max_skipped: float | None) -> Iterator[dict]:
    check_split(split, f"rafdb_{part}")
    folder = part_dir(require_root(root, f"rafdb_{part}", EXPECTED), part)
    path = _label_path(folder)
    entries = _entries(image_dir(folder, part, aligned), path, part, split, aligned)
    skips = Skips(f"rafdb_{part}", max_skipped)
    return still_image_records(f"rafdb_{part}", entries, caption or CaptionConfig(style="emotion"), skips)


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            aligned: bool = True, max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """RAF-DB basic (7 classes) as records; official train/test split."""
    return _records("basic", root, split, caption, aligned, max_skipped)


def compound_records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True,
                     *, aligned: bool = True, max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """RAF-DB compound (11 two-emotion classes) as records; official train/test split."""
    return _records("compound", root, split, caption, aligned, max_skipped)
