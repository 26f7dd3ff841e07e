"""DISFA → records (12 AUs: 1 2 4 5 6 9 12 15 17 20 25 26, present when intensity >= 2).

Layouts read (docs/datasets.md cites the public readers each comes from)::

    ROOT/ActionUnit_Labels/SN001/SN001_au1.txt      the release's per-subject, per-AU intensity files (12 per subject)
    ROOT/Images_LeftCamera/SN001/00001.jpg          frames of Videos_LeftCamera/LeftVideoSN001_comp.avi, or
    ROOT/img/SN001/0.png                            ME-GraphAU's data/DISFA/img (numbered from 0), or
    ROOT/SN001/0.jpg                                PyTorch-JAANet's dataset/DISFA (numbered from 0), or
    ROOT/images/LeftVideoSN001_comp/LeftVideoSN001_comp_0001.png   per-video folders of an extraction script

The frame folder may be named ``SN001``, ``LeftVideoSN001`` or ``LeftVideoSN001_comp`` (right-camera folders are
ignored); an image's number is the integer its stem ends with. Intensity file: one line per frame,
``frame,intensity`` (frames counted from 1, intensity 0-5; e.g. ``1,0``). Extracted frames are numbered from 1 or
from 0 depending on the tool: the converter compares each folder with its label file, pairs image N with label
frame N (numbered from 1) or N+1 (from 0) and logs the latter; a folder that cannot tell is refused, and
``frame_base`` (``--frame-base 0|1``) decides. Extract with
``ffmpeg -i Videos_LeftCamera/LeftVideoSN001_comp.avi -start_number 1 -q:v 2 Images_LeftCamera/SN001/%05d.jpg``.
A frame missing from some of a subject's 12 files, or without an image, is skipped and counted.

Labels: ``aus`` (intensity >= 2), ``au_intensity`` ({"1": 0..5, ...} for all 12 AUs, string keys as in JSON),
``subject`` = ``sequence`` ("SN001"), ``frame`` (the label files' number). Split: subject-exclusive — the field's 3
folds (``fold``/``folds``), an explicit ``test_subjects`` list, or the subject-split rule over the 27 subjects
(default a third for test).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import DATASET_AUS
from expblip.data.sources._common import (
    Skips,
    _subdirs,
    check_split,
    in_split,
    malformed,
    one_dir,
    parse_int,
    require_file,
    require_root,
    require_test_part,
    text_lines,
)
from expblip.data.sources._video import Frame, VideoSequence, video_records
from expblip.data.sources.folds import choose_test_subjects

DATASET = "disfa"
EXPECTED = ("ROOT/ActionUnit_Labels/<SNxxx>/<SNxxx>_au<N>.txt and frames as ROOT/Images_LeftCamera/<SNxxx>/<frame>.jpg "
            "(or img/, images/, or the SNxxx folders in ROOT)")
IMAGE_DIRS = ("Images_LeftCamera", "img", "images", "Images", "frames", "Videos_LeftCamera_frames")
_FRAME_FOLDER = re.compile(r"^(?:LeftVideo)?(SN\d{3})(?:_comp)?$", re.IGNORECASE)
PRESENT_AT = 2  # an AU counts as present at intensity >= 2 (EXPBLIP.md)
MAX_INTENSITY = 5
TEST_FRACTION = 1 / 3
_SUBJECT = re.compile(r"^SN\d{3}$")


def read_intensity_file(path: Path) -> dict[int, int]:
    """{frame: intensity} of one ``SNxxx_auN.txt``; a malformed line raises ValueError naming file and line."""
    values: dict[int, int] = {}
    for lineno, text in text_lines(path):
        cells = [c.strip() for c in text.split(",")]
        if len(cells) != 2:
            raise malformed(path, lineno, f"expected 'frame,intensity', got {text!r}")
        frame = parse_int(cells[0], path, lineno, "frame number")
        intensity = parse_int(cells[1], path, lineno, "intensity")
        if not 0 <= intensity <= MAX_INTENSITY:
            raise malformed(path, lineno, f"intensity must be 0..{MAX_INTENSITY}, got {intensity}")
        if frame in values:
            raise malformed(path, lineno, f"frame {frame} appears twice")
        values[frame] = intensity
    return values


def _label_files(label_dir: Path, subject: str) -> dict[int, Path]:
    return {au: require_file(label_dir / subject / f"{subject}_au{au}.txt", DATASET,
                             f"the AU{au} intensity file of {subject} ('frame,intensity' lines)")
            for au in DATASET_AUS[DATASET]}


def read_subject(files: dict[int, Path], subject: str, skips: Skips) -> list[Frame]:
    """The frames labelled in all 12 files of a subject, with their intensities and present AUs."""
    per_au = {au: read_intensity_file(path) for au, path in files.items()}
    all_frames = set().union(*per_au.values())
    common = set.intersection(*(set(v) for v in per_au.values()))
    for frame in sorted(all_frames - common):
        skips.add("frame missing from some AU files", f"{subject} frame {frame}")
    frames = []
    for number in sorted(common):
        intensity = {au: per_au[au][number] for au in DATASET_AUS[DATASET]}
        aus = [au for au, value in intensity.items() if value >= PRESENT_AT]
        frames.append(Frame(number, aus, {"au_intensity": {str(au): v for au, v in intensity.items()}}))
    return frames


def frame_folders(folder: Path) -> dict[str, Path]:
    """{subject: its left-camera frame folder} among the subfolders of ``folder``."""
    found: dict[str, Path] = {}
    for path in _subdirs(folder):
        match = _FRAME_FOLDER.match(path.name)
        if match:
            subject = match.group(1).upper()
            if subject in found:
                raise ValueError(f"{DATASET}: two frame folders for {subject}: {found[subject]} and {path}; keep one")
            found[subject] = path
    return found


def image_root(base: Path) -> Path:
    """The folder holding the per-subject frame folders; without one, say how to extract the frames."""
    try:
        return one_dir(base, DATASET, lambda p: (p == base or p.name in IMAGE_DIRS) and bool(frame_folders(p)),
                       "frame folder (<SNxxx>/<frame>.jpg)", 3, EXPECTED)
    except FileNotFoundError:
        videos = sorted(base.glob("**/LeftVideoSN*_comp.avi"))[:1]
        if videos:
            raise FileNotFoundError(
                f"{DATASET}: found the videos ({videos[0]}, ...) but no extracted frames; extract each with "
                f"ffmpeg -i {videos[0]} -start_number 1 -q:v 2 {base}/Images_LeftCamera/SN001/%05d.jpg") from None
        raise


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0,
            test_subjects: str | Iterable[str] | None = None, fold: int | None = None, folds: int | None = None,
            frame_base: int | None = None, max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """Left-camera frames of DISFA as records; ``subsample`` keeps every 10th frame plus label changes."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction, test_subjects or fold)
    base = require_root(root, DATASET, EXPECTED)
    label_dir = one_dir(base, DATASET, lambda p: p.name == "ActionUnit_Labels", "ActionUnit_Labels folder", 3,
                        EXPECTED)
    subjects = sorted(p.name for p in label_dir.iterdir() if p.is_dir() and _SUBJECT.match(p.name))
    if not subjects:
        raise FileNotFoundError(f"{DATASET}: no SNxxx subject folders in {label_dir}; expected {EXPECTED}")
    frames_root = image_root(base)
    folders = frame_folders(frames_root)
    test = choose_test_subjects(DATASET, subjects, test_fraction, split_seed, test_subjects, fold, folds)
    chosen = [s for s in subjects if in_split(split, s in test)]
    files = {s: _label_files(label_dir, s) for s in chosen}  # checked now: a missing file fails before any work
    sequences = [VideoSequence(s, s, folders.get(s, frames_root / s), partial(read_subject, files[s], s))
                 for s in chosen]
    return video_records(DATASET, sequences, caption or CaptionConfig(style="au"), subsample, frame_base,
                         max_skipped)
