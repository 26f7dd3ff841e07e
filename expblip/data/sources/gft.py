"""Sayette Group Formation Task (GFT) → records (10 AUs: 1 2 4 6 10 12 14 15 23 24).

Expected layout (one video per participant; the video id, e.g. ``001A`` = group 001, seat A, is the subject)::

    ROOT/AU_OCC/001A.csv            one occurrence CSV per video, in the same format as BP4D's (same FACS lab)
    ROOT/images/001A/000123.jpg     the video's frames (``img/`` works too); the stem ends in the frame number

No public reader of GFT's raw release was found (the readers seen consume their own preprocessed frame lists), so
*this layout is expblip's choice*, as docs/datasets.md says; both folders may sit a few levels below ROOT.

Occurrence CSV: row 1 is a header, the frame column first, then one column per AU (``1``, ``AU1`` or ``AU01``); each
further row is ``frame,v1,v2,...`` with 0 (absent), 1 (present) or 9 (not coded). Frames with a 9 for any of the 10
AUs are left out by rule, labelled frames without an image are skipped (bad data); both are counted. Frames are
extracted by the user, so each folder's numbering (from 0 or 1 against the CSV) is detected as for DISFA, refused
when it cannot be told, and ``frame_base`` decides.

Labels: ``aus`` (the 10-AU subset), ``subject`` = ``sequence`` (the video id), ``frame``. Split: subject-exclusive
(default a fifth of the participants for test), an explicit ``test_subjects`` list, or ``fold``/``folds`` (a seeded
partition: GFT has no published fold lists).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import (
    check_split,
    in_split,
    one_dir,
    require_root,
    require_test_part,
)
from expblip.data.sources._video import VideoSequence, read_occurrence_csv, require_unpacked, video_records
from expblip.data.sources.folds import choose_test_subjects

DATASET = "gft"
EXPECTED = "ROOT/AU_OCC/<video>.csv and ROOT/images/<video>/<frame>.jpg"
TEST_FRACTION = 0.2
IMAGE_DIRS = ("images", "img", "frames")
_VIDEO = re.compile(r"^[A-Za-z0-9_-]+$")


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0,
            test_subjects: str | Iterable[str] | None = None, fold: int | None = None, folds: int | None = None,
            frame_base: int | None = None, max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """Frames of GFT as records; ``subsample`` keeps every 10th frame plus the frames whose AU labels change."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction, test_subjects or fold)
    base = require_root(root, DATASET, EXPECTED)
    label_dir = one_dir(base, DATASET, lambda p: p.name == "AU_OCC" and any(p.glob("*.csv")),
                        "AU_OCC folder of <video>.csv files", 2, EXPECTED)
    image_dir = one_dir(base, DATASET, lambda p: p.name in IMAGE_DIRS, "frame folder (images/<video>/)", 2, EXPECTED)
    files = sorted(label_dir.glob("*.csv"))
    for path in files:
        if not _VIDEO.match(path.stem):
            raise ValueError(f"{path}: a GFT video id may hold only letters, digits, '_' and '-'")
    test = choose_test_subjects(DATASET, {p.stem for p in files}, test_fraction, split_seed, test_subjects, fold,
                                folds)
    chosen = [p for p in files if in_split(split, p.stem in test)]
    require_unpacked(DATASET, [image_dir / p.stem for p in chosen], image_dir)
    sequences = [VideoSequence(p.stem, p.stem, image_dir / p.stem, partial(read_occurrence_csv, p, DATASET))
                 for p in chosen]
    return video_records(DATASET, sequences, caption or CaptionConfig(style="au"), subsample, frame_base,
                         max_skipped)
