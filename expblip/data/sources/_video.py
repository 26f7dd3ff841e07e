"""Shared by the video AU datasets (BP4D, DISFA, GFT): occurrence CSVs, frame folders and the paper's subsampling.

Subsampling (EXPBLIP.md, "Video AU sets were subsampled"): within one sequence, ordered by frame number, keep the
frames at positions 0, 10, 20, ... plus every frame whose AU set (after restriction to the dataset's subset) differs
from the previous labelled frame's. Positions count labelled frames, so gaps in the frame numbers do not shift it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import DATASET_AUS
from expblip.data.sources._common import (
    IMAGE_EXTENSIONS,
    Skips,
    au_column,
    csv_rows,
    image_bytes,
    make_record,
    malformed,
    parse_int,
    record_key,
)

EVERY = 10  # keep every 10th frame of a sequence (plus the frames where the AU labels change)
UNKNOWN = 9  # BP4D/GFT occurrence code for "not coded"


@dataclass
class Frame:
    """One labelled video frame."""

    frame: int  # frame number as in the label file (= the integer stem of its image file)
    aus: list[int]  # active AUs of the dataset's subset, sorted
    extra: dict = field(default_factory=dict)  # more labels, e.g. DISFA's {"au_intensity": {"1": 3, ...}}


@dataclass
class VideoSequence:
    """One video of one subject: where its frames lie and how to read its labels."""

    name: str  # e.g. "F001_T1"; unique within the dataset, part of every key
    subject: str  # subject id for subject-exclusive splits, e.g. "F001"
    image_dir: Path  # the folder of <frame>.jpg files
    read_frames: Callable[[Skips], list[Frame]]  # parses the labels when the sequence is reached (lazily)
    extra: dict = field(default_factory=dict)  # labels shared by all frames, e.g. {"task": "T1"}


def subsample_mask(label_sets: Sequence[Sequence[int]], every: int = EVERY) -> list[bool]:
    """Which frames of a sequence survive: position % every == 0, or a label set unlike the previous frame's."""
    keep, previous = [], None
    for position, aus in enumerate(label_sets):
        current = tuple(sorted(aus))
        keep.append(position % every == 0 or (previous is not None and current != previous))
        previous = current
    return keep


def subsample(frames: Sequence[Frame], every: int = EVERY) -> list[Frame]:
    mask = subsample_mask([f.aus for f in frames], every)
    return [f for f, kept in zip(frames, mask, strict=True) if kept]


def frame_images(folder: Path) -> dict[int, Path]:
    """{frame number: image path} for ``<frame>.jpg|png`` files in ``folder`` (any zero padding); one listing."""
    images: dict[int, Path] = {}
    if not folder.is_dir():
        return images
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.isdigit():
            number = int(path.stem)
            if number in images:
                raise ValueError(f"{folder}: two images for frame {number}: {images[number].name} and {path.name}")
            images[number] = path
    return images


def _occurrence_header(path: Path, header: list[str], dataset: str) -> list[int]:
    """AU numbers of columns 1.. (column 0 is the frame number); the dataset's subset must all be present."""
    aus = []
    for cell in header[1:]:
        au = au_column(cell)
        if au is None:
            raise malformed(path, 1, f"header cell {cell!r} is not an AU number (expected e.g. 1, AU1 or AU01)")
        aus.append(au)
    missing = sorted(set(DATASET_AUS[dataset]) - set(aus))
    if missing:
        raise malformed(path, 1, f"header lacks column(s) for AU {missing} of the {dataset} subset")
    return aus


def read_occurrence_csv(path: Path, dataset: str, skips: Skips) -> list[Frame]:
    """BP4D/GFT occurrence CSV → frames with their active subset AUs, ordered by frame.

    Row 1 is the header: a frame column, then one column per AU. Cells are 0 (absent), 1 (present) or 9 (not coded).
    A frame with 9 for any AU of the subset has no complete label: it is skipped and counted.
    """
    rows = csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise malformed(path, 1, "empty file: expected a header row of AU numbers")
    columns = _occurrence_header(path, first[1], dataset)
    subset = {au: 1 + i for i, au in enumerate(columns) if au in DATASET_AUS[dataset]}
    frames: dict[int, Frame] = {}
    for lineno, row in rows:
        if len(row) != len(columns) + 1:
            raise malformed(path, lineno, f"{len(row)} cells, the header has {len(columns) + 1}")
        number = parse_int(row[0], path, lineno, "frame number")
        if number in frames:
            raise malformed(path, lineno, f"frame {number} appears twice")
        values = {au: parse_int(row[col], path, lineno, f"AU{au} value") for au, col in subset.items()}
        bad = {au: v for au, v in values.items() if v not in (0, 1, UNKNOWN)}
        if bad:
            raise malformed(path, lineno, f"occurrence values must be 0, 1 or {UNKNOWN} (not coded), got {bad}")
        if UNKNOWN in values.values():
            skips.add("AU not coded (9)", f"{path.name} frame {number}")
            continue
        frames[number] = Frame(number, sorted(au for au, v in values.items() if v == 1))
    return [frames[n] for n in sorted(frames)]


def video_records(dataset: str, sequences: Iterable[VideoSequence], caption: CaptionConfig, subsample_frames: bool
                  ) -> Iterator[dict]:
    """Records of every (subsampled) frame of every sequence; a labelled frame without an image is counted."""
    skips, kept = Skips(dataset), 0
    for seq in sequences:
        frames = seq.read_frames(skips)
        frames = subsample(frames) if subsample_frames else frames
        images = frame_images(seq.image_dir)
        for frame in frames:
            path = images.get(frame.frame)
            if path is None:
                skips.add("missing image", f"frame {frame.frame}: no <frame>.jpg/.png in {seq.image_dir}")
                continue
            data = image_bytes(path, skips)
            if data is None:
                continue
            labels = {"aus": frame.aus, "emotions": None, "dataset": dataset, "subject": seq.subject,
                      "sequence": seq.name, "frame": frame.frame, **seq.extra, **frame.extra}
            kept += 1
            yield make_record(record_key(dataset, seq.name, f"{frame.frame:05d}"), data, labels, caption)
    skips.report(kept)
