"""Shared by the video AU datasets (BP4D, DISFA, GFT): occurrence CSVs, frame folders and the paper's subsampling.

Subsampling (EXPBLIP.md, "Video AU sets were subsampled"): within one sequence, ordered by frame number, keep the
frames at positions 0, 10, 20, ... plus every frame whose AU set (after restriction to the dataset's subset) differs
from the previous labelled frame's. Positions count labelled frames, so gaps in the frame numbers do not shift it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.facs import DATASET_AUS
from expblip.data.sources._common import (
    DOCS,
    IMAGE_EXTENSIONS,
    Skips,
    archives,
    au_column,
    csv_rows,
    image_bytes,
    make_record,
    malformed,
    parse_int,
    record_key,
    unpack_command,
)

log = logging.getLogger("expblip.data.sources")
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


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def frame_number(stem: str) -> int | None:
    """The frame number a file stem ends with: "0123" → 123, "LeftVideoSN001_comp_0042" → 42, else None."""
    match = _TRAILING_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def frame_images(folder: Path) -> dict[int, Path]:
    """{frame number: image path} for the images in ``folder`` whose stem ends in a number (any padding or prefix,
    e.g. ``0123.jpg``, ``0.png``, ``LeftVideoSN001_comp_0001.png``); one listing."""
    images: dict[int, Path] = {}
    if not folder.is_dir():
        return images
    for path in folder.iterdir():
        number = frame_number(path.stem) if path.suffix.lower() in IMAGE_EXTENSIONS else None
        if number is None:
            continue
        if number in images:
            raise ValueError(f"{folder}: two images for frame {number}: {images[number].name} and {path.name}")
        images[number] = path
    return images


class FrameNumberingError(ValueError):
    """The image files of a sequence could be numbered from 0 or from 1: refuse rather than guess."""


def _pairing_counts(labels: Sequence[int], images: set[int], offset: int) -> tuple[int, int]:
    """(labelled frames that find an image, images that find no labelled frame) when image = frame - offset."""
    wanted = {f - offset for f in labels}
    return len(wanted & images), len(images - wanted)


def detect_offset(labels: Sequence[int], images: set[int]) -> int | None:
    """How a folder's image numbers relate to the label files' frame numbers: 0 (image N shows label frame N),
    1 (image N shows label frame N + 1: frames extracted counting from 0), or None when the folder cannot tell.

    A pairing wins when it finds an image for more labelled frames *and* leaves no more images without a label:
    a 0-based folder of a 1-based label file has image 0 (no label) and lacks the last frame's image.
    """
    (hit_same, extra_same), (hit_shift, extra_shift) = (_pairing_counts(labels, images, o) for o in (0, 1))
    if hit_same > hit_shift and extra_same <= extra_shift:
        return 0
    if hit_shift > hit_same and extra_shift <= extra_same:
        return 1
    return None


def _span(numbers: Iterable[int]) -> str:
    numbers = sorted(numbers)
    return f"{numbers[0]}..{numbers[-1]} ({len(numbers)})" if numbers else "none"


def image_offset(seq: VideoSequence, labels: Sequence[int], images: set[int], frame_base: int | None,
                 named_by_labels: bool) -> int:
    """The offset (image number = label frame - offset) for one sequence; ``frame_base`` 1 or 0 decides it,
    None detects it. A folder that cannot tell raises :class:`FrameNumberingError`, unless the dataset ships its
    frames named by the label numbers (``named_by_labels``, BP4D), where a tie means the release's own naming."""
    detected = detect_offset(labels, images) if images and labels else 0
    if frame_base is not None:
        if detected is not None and detected != 1 - frame_base:
            log.warning("%s: --frame-base %d given, but its images look numbered from %d; using --frame-base",
                        seq.image_dir, frame_base, 1 - detected)
        return 1 - frame_base
    if detected is not None:
        return detected
    hits = _pairing_counts(labels, images, 0)[0]
    if named_by_labels and hits:
        return 0
    if not _pairing_counts(labels, images, 1)[0] and not hits:
        raise FrameNumberingError(
            f"{seq.image_dir}: image numbers {_span(images)} match none of the label frames {_span(labels)} of "
            f"{seq.name}, numbered either way; check that the folder holds this sequence's frames ({DOCS})")
    raise FrameNumberingError(
        f"{seq.image_dir}: cannot tell whether the images (numbers {_span(images)}) count frames from 0 or from 1 "
        f"against the label frames {_span(labels)} of {seq.name}; pass --frame-base 1 if image N shows label frame "
        f"N, or --frame-base 0 if image N shows label frame N+1 (frames extracted counting from 0) ({DOCS})")


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
            skips.drop("AU not coded (9)", f"{path.name} frame {number}")
            continue
        frames[number] = Frame(number, sorted(au for au, v in values.items() if v == 1))
    return [frames[n] for n in sorted(frames)]


def video_records(dataset: str, sequences: Iterable[VideoSequence], caption: CaptionConfig, subsample_frames: bool,
                  frame_base: int | None = None, max_skipped: float | None = None, named_by_labels: bool = False
                  ) -> Iterator[dict]:
    """Records of every (subsampled) frame of every sequence; a labelled frame without an image is counted.

    Each sequence's images are paired with its label frames by :func:`image_offset` (``frame_base`` None:
    detected per sequence, logged when it is not the label files' own numbering). Labels and keys always carry the
    label files' frame numbers.
    """
    skips, kept, shifted = Skips(dataset, max_skipped), 0, []
    for seq in sequences:
        frames = seq.read_frames(skips)
        images = frame_images(seq.image_dir)
        offset = image_offset(seq, [f.frame for f in frames], set(images), frame_base, named_by_labels)
        if offset and frame_base is None:
            shifted.append(seq.name)
            if len(shifted) == 1:
                log.warning("%s: %s: images are numbered from 0 (image N shows label frame N+1); pairing them so "
                            "(detected; --frame-base overrides)", dataset, seq.image_dir)
        for frame in subsample(frames) if subsample_frames else frames:
            path = images.get(frame.frame - offset)
            if path is None:
                skips.add("missing image", f"{seq.name} frame {frame.frame}: no image {frame.frame - offset} in "
                          f"{seq.image_dir}")
                continue
            data = image_bytes(path, skips)
            if data is None:
                continue
            labels = {"aus": frame.aus, "emotions": None, "dataset": dataset, "subject": seq.subject,
                      "sequence": seq.name, "frame": frame.frame, **seq.extra, **frame.extra}
            kept += 1
            yield make_record(record_key(dataset, seq.name, f"{frame.frame:05d}"), data, labels, caption)
    if shifted:
        log.warning("%s: %d sequence(s) with images numbered from 0: %s", dataset, len(shifted),
                    ", ".join(shifted[:10]) + (" ..." if len(shifted) > 10 else ""))
    skips.finish(kept)


def require_unpacked(dataset: str, folders: Iterable[Path], search: Path) -> None:
    """FileNotFoundError with the unpack commands when a sequence folder is missing but an archive named like it
    (``F001.zip``, ``F001_T1.tar``, ...) lies beside it or under ``search``: frames are never read from archives."""
    missing = [folder for folder in folders if not folder.is_dir()]
    present = archives(search, 3) if missing else []
    hints = []
    for folder in missing:
        names = {folder.name, f"{folder.parent.name}_{folder.name}", folder.parent.name}
        match = next((a for a in sorted(present) if a.name.split(".")[0] in names), None)
        if match is not None:
            target = folder if match.name.split(".")[0] != folder.parent.name else folder.parent
            hints.append(unpack_command(match, target))
    hints = list(dict.fromkeys(hints))
    if hints:
        more = f" (and {len(hints) - 3} more)" if len(hints) > 3 else ""
        raise FileNotFoundError(f"{dataset}: frames are still in archives; unpack them first: "
                                + "; ".join(hints[:3]) + more + f" ({DOCS})")
