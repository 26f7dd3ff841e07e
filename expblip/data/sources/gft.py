"""Sayette Group Formation Task (GFT) → records (10 AUs: 1 2 4 6 10 12 14 15 23 24).

Expected layout (one video per participant; the video id, e.g. ``001A`` = group 001, seat A, is the subject)::

    ROOT/AU_OCC/001A.csv            one occurrence CSV per video, in the same format as BP4D's (same FACS lab)
    ROOT/images/001A/000123.jpg     the video's frames; the integer file stem is the frame number

Occurrence CSV: row 1 is a header, the frame column first, then one column per AU (``1``, ``AU1`` or ``AU01``); each
further row is ``frame,v1,v2,...`` with 0 (absent), 1 (present) or 9 (not coded). Frames with a 9 for any of the 10
AUs, and labelled frames without an image, are skipped and counted.

Labels: ``aus`` (the 10-AU subset), ``subject`` = ``sequence`` (the video id), ``frame``. Split: subject-exclusive
(default a fifth of the participants for test) or an explicit ``test_subjects`` list (e.g. a published protocol's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial

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

DATASET = "gft"
EXPECTED = "ROOT/AU_OCC/<video>.csv and ROOT/images/<video>/<frame>.jpg"
TEST_FRACTION = 0.2
_VIDEO = re.compile(r"^[A-Za-z0-9_-]+$")


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0,
            test_subjects: str | Iterable[str] | None = None, **_: object) -> Iterator[dict]:
    """Frames of GFT as records; ``subsample`` keeps every 10th frame plus the frames whose AU labels change."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction, test_subjects)
    base = require_root(root, DATASET, EXPECTED)
    label_dir = require_dir(base / "AU_OCC", DATASET, "one occurrence CSV per video, AU_OCC/<video>.csv")
    require_dir(base / "images", DATASET, "frames as images/<video>/<frame>.jpg")
    files = sorted(label_dir.glob("*.csv"))
    for path in files:
        if not _VIDEO.match(path.stem):
            raise ValueError(f"{path}: a GFT video id may hold only letters, digits, '_' and '-'")
    if not files:
        raise FileNotFoundError(f"{DATASET}: no <video>.csv files in {label_dir}; expected {EXPECTED}")
    test = test_subject_set(DATASET, {p.stem for p in files}, test_fraction, split_seed, test_subjects)
    sequences = [VideoSequence(p.stem, p.stem, base / "images" / p.stem, partial(read_occurrence_csv, p, DATASET))
                 for p in files if in_split(split, p.stem in test)]
    return video_records(DATASET, sequences, caption or CaptionConfig(style="au"), subsample)
