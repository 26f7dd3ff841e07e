"""BP4D-Spontaneous → records (12 AUs: 1 2 4 6 7 10 12 14 15 17 23 24).

Expected layout (the release's own names)::

    ROOT/AUCoding/AU_OCC/F001_T1.csv        one occurrence CSV per subject and task (F/M + 3 digits, T1..T8)
    ROOT/2D+3D/F001/T1/0123.jpg             the task's frames; the integer file stem is the frame number

Occurrence CSV: row 1 is a header, the frame column first, then one column per AU (``1``, ``AU1`` or ``AU01``).
Each further row is ``frame,v1,v2,...`` with 0 (absent), 1 (present) or 9 (not coded). Frames with a 9 for any of
the 12 AUs are skipped (counted), as are labelled frames without an image.

Labels: ``aus`` (the 12-AU subset), ``subject`` ("F001"), ``sequence`` ("F001_T1"), ``task`` ("T1"), ``frame``.
Split: subject-exclusive, :func:`~expblip.data.sources._common.subject_split` over the 41 subjects (default a third
for test, the usual 3-fold protocol's size) or an explicit ``test_subjects`` list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import (
    check_split,
    in_split,
    require_dir,
    require_root,
    require_test_part,
    test_subject_set,
)
from expblip.data.sources._video import VideoSequence, read_occurrence_csv, video_records

DATASET = "bp4d"
EXPECTED = "ROOT/AUCoding/AU_OCC/<subject>_<task>.csv and ROOT/2D+3D/<subject>/<task>/<frame>.jpg"
TEST_FRACTION = 1 / 3
_SEQUENCE = re.compile(r"^([FM]\d{3})_(T\d+)$")


def _sequences(base: Path) -> list[tuple[str, str, Path]]:
    """(subject, task, label file) for every AU_OCC CSV, sorted; a CSV with another name is an error."""
    label_dir = require_dir(base / "AUCoding" / "AU_OCC", DATASET, "one <subject>_<task>.csv per task")
    require_dir(base / "2D+3D", DATASET, "frames as 2D+3D/<subject>/<task>/<frame>.jpg")
    found = []
    for path in sorted(label_dir.glob("*.csv")):
        match = _SEQUENCE.match(path.stem)
        if not match:
            raise ValueError(f"{path}: BP4D label files are named <subject>_<task>.csv, e.g. F001_T1.csv")
        found.append((match.group(1), match.group(2), path))
    if not found:
        raise FileNotFoundError(f"{DATASET}: no <subject>_<task>.csv files in {label_dir}; expected {EXPECTED}")
    return found


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0,
            test_subjects: str | Iterable[str] | None = None, **_: object) -> Iterator[dict]:
    """Frames of BP4D as records; ``subsample`` keeps every 10th frame plus the frames whose AU labels change."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction, test_subjects)
    base = require_root(root, DATASET, EXPECTED)
    found = _sequences(base)
    test = test_subject_set(DATASET, {s for s, _, _ in found}, test_fraction, split_seed, test_subjects)
    sequences = [
        VideoSequence(f"{subject}_{task}", subject, base / "2D+3D" / subject / task,
                      partial(read_occurrence_csv, path, DATASET), {"task": task})
        for subject, task, path in found if in_split(split, subject in test)
    ]
    return video_records(DATASET, sequences, caption or CaptionConfig(style="au"), subsample)
