"""BP4D-Spontaneous → records (12 AUs: 1 2 4 6 7 10 12 14 15 17 23 24).

Layouts read (docs/datasets.md cites the public readers each comes from)::

    ROOT/AUCoding/AU_OCC/F001_T1.csv          one occurrence CSV per subject and task (F/M + 3 digits, T1..T8);
                                              ROOT/AU_OCC/ works too
    ROOT/2D+3D/F001/T1/0123.jpg               the release's frames; the integer file stem is the frame number
    ROOT/Sequences(2D+3D)/F001/T1/0123.jpg    copies mirrored from the Binghamton server
    ROOT/img/F001/T1/2440.jpg                 ME-GraphAU's data/BP4D/img (unpadded frame numbers)
    ROOT/F001/T1/2440.jpg                     PyTorch-JAANet's dataset/BP4D (subject folders in ROOT itself)

Each of those folders may sit a few levels deeper (a download that kept the server's path); a task folder may also
be ``F001_T1/``. Per-subject archives (``2D+3D/F001.zip``) are not read: the converter names the command that
unpacks them. Two candidate frame folders at once are an error (keep one).

Occurrence CSV: row 1 is a header, the frame column first, then one column per AU (``1``, ``AU1`` or ``AU01``).
Each further row is ``frame,v1,v2,...`` with 0 (absent), 1 (present) or 9 (not coded). Frames with a 9 for any of
the 12 AUs are left out (counted, by rule); labelled frames without an image are skipped (counted as bad data).
Images carry the CSV's frame numbers (the release ships them so; ME-GraphAU and JAA-Net read them so); a folder
that is clearly numbered one lower is paired and logged, ``frame_base`` forces either way.

Labels: ``aus`` (the 12-AU subset), ``subject`` ("F001"), ``sequence`` ("F001_T1"), ``task`` ("T1"), ``frame``.
Split: subject-exclusive — the field's 3 folds (``fold``/``folds``, expblip.data.sources.folds), an explicit
``test_subjects`` list, or :func:`~expblip.data.sources._common.subject_split` over the 41 subjects (default a
third for test).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import (
    _subdirs,
    check_split,
    in_split,
    one_dir,
    require_root,
    require_test_part,
)
from expblip.data.sources._video import VideoSequence, read_occurrence_csv, require_unpacked, video_records
from expblip.data.sources.folds import choose_test_subjects

DATASET = "bp4d"
EXPECTED = ("ROOT/AUCoding/AU_OCC/<subject>_<task>.csv and frames as ROOT/2D+3D/<subject>/<task>/<frame>.jpg "
            "(or Sequences(2D+3D)/, img/, or the subject folders in ROOT)")
TEST_FRACTION = 1 / 3
IMAGE_DIRS = ("2D+3D", "Sequences(2D+3D)", "img", "images")
_SEQUENCE = re.compile(r"^([FM]\d{3})_(T\d+)$")
_SUBJECT = re.compile(r"^[FM]\d{3}(_T\d+)?$")


def _has_subjects(folder: Path) -> bool:
    return any(_SUBJECT.match(d.name) for d in _subdirs(folder))


def label_dir(base: Path) -> Path:
    return one_dir(base, DATASET, lambda p: p.name == "AU_OCC" and any(p.glob("*.csv")),
                   "AU_OCC folder of <subject>_<task>.csv files", 3, EXPECTED)


def image_root(base: Path) -> Path:
    """The folder that holds the subject folders (see the module docstring)."""
    return one_dir(base, DATASET, lambda p: (p == base or p.name in IMAGE_DIRS) and _has_subjects(p),
                   "frame folder (<subject>/<task>/<frame>.jpg)", 4, EXPECTED)


def task_dir(root: Path, subject: str, task: str) -> Path:
    flat = root / f"{subject}_{task}"
    return flat if flat.is_dir() and not (root / subject / task).is_dir() else root / subject / task


def _sequences(label_folder: Path) -> list[tuple[str, str, Path]]:
    """(subject, task, label file) for every AU_OCC CSV, sorted; a CSV with another name is an error."""
    found = []
    for path in sorted(label_folder.glob("*.csv")):
        match = _SEQUENCE.match(path.stem)
        if not match:
            raise ValueError(f"{path}: BP4D label files are named <subject>_<task>.csv, e.g. F001_T1.csv")
        found.append((match.group(1), match.group(2), path))
    return found


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0,
            test_subjects: str | Iterable[str] | None = None, fold: int | None = None, folds: int | None = None,
            frame_base: int | None = None, max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """Frames of BP4D as records; ``subsample`` keeps every 10th frame plus the frames whose AU labels change."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction, test_subjects or fold)
    base = require_root(root, DATASET, EXPECTED)
    found = _sequences(label_dir(base))
    frames = image_root(base)
    test = choose_test_subjects(DATASET, {s for s, _, _ in found}, test_fraction, split_seed, test_subjects, fold,
                                folds)
    chosen = [(s, t, p) for s, t, p in found if in_split(split, s in test)]
    require_unpacked(DATASET, [task_dir(frames, s, t) for s, t, _ in chosen], frames)
    sequences = [VideoSequence(f"{subject}_{task}", subject, task_dir(frames, subject, task),
                               partial(read_occurrence_csv, path, DATASET), {"task": task})
                 for subject, task, path in chosen]
    return video_records(DATASET, sequences, caption or CaptionConfig(style="au"), subsample, frame_base,
                         max_skipped, named_by_labels=True)
