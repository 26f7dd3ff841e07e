"""FaceME → records: 85 expression multi-labels from 3 annotators, a label kept when at least 2 agree.

Expected layout::

    ROOT/label_names.txt        the label vocabulary, one name per line (85 in FaceME)
    ROOT/annotations.csv        header "image,annotator_1,annotator_2,annotator_3"; one row per image
    ROOT/images/<image>         the images, by the file name in the image column

Each annotator cell is a ``;``-separated list of label *names* from label_names.txt (case-insensitive; empty = none).
A name not in the vocabulary, or a row without exactly 3 annotator cells, raises ValueError naming file and line.

Labels: ``expressions`` — the majority labels (>= 2 of 3), in vocabulary order; ``emotions`` — the canonical
emotions (facs.EMOTIONS) those labels name, through :data:`EMOTION_SYNONYMS` (a label naming none, e.g. "yawning",
stays only in ``expressions``); ``aus`` None. Split: no official test set (the paper trains on all 10,052); with
``test_fraction`` > 0 an image is test when ``sha256(f"{split_seed}:{image}") < test_fraction``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import (
    Entry,
    Skips,
    check_split,
    csv_rows,
    image_in_test,
    in_split,
    malformed,
    record_key,
    release_root,
    require_file,
    require_root,
    require_test_part,
    still_image_records,
    still_labels,
    text_lines,
)

DATASET = "faceme"
ANNOTATORS = 3
MAJORITY = 2  # keep a label when at least 2 of the 3 annotators chose it
EXPECTED = "ROOT/label_names.txt, ROOT/annotations.csv (image,annotator_1,annotator_2,annotator_3), ROOT/images/"

# FaceME label name (lower case) → canonical emotion. Labels absent here name no basic emotion.
EMOTION_SYNONYMS: dict[str, str] = {
    **dict.fromkeys(("neutral", "calm"), "neutral"),
    **dict.fromkeys(("happy", "happiness", "joy", "joyful", "delighted", "cheerful"), "happiness"),
    **dict.fromkeys(("sad", "sadness", "unhappy", "sorrowful", "sorrow", "grief"), "sadness"),
    **dict.fromkeys(("surprise", "surprised", "astonished", "amazed", "shocked"), "surprise"),
    **dict.fromkeys(("fear", "fearful", "afraid", "scared", "frightened", "terrified"), "fear"),
    **dict.fromkeys(("disgust", "disgusted"), "disgust"),
    **dict.fromkeys(("anger", "angry", "furious", "rage", "enraged"), "anger"),
    **dict.fromkeys(("contempt", "contemptuous", "disdain", "disdainful"), "contempt"),
}


def read_vocabulary(path: Path) -> list[str]:
    names: list[str] = []
    for lineno, text in text_lines(path):
        if text.lower() in (n.lower() for n in names):
            raise malformed(path, lineno, f"label {text!r} is listed twice")
        names.append(text)
    if not names:
        raise malformed(path, 1, "empty vocabulary: expected one label name per line")
    return names


def majority_labels(cells: list[str], vocabulary: list[str], path: Path, lineno: int) -> list[str]:
    """The vocabulary labels chosen by >= MAJORITY annotators, in vocabulary order."""
    index = {name.lower(): i for i, name in enumerate(vocabulary)}
    votes: Counter[int] = Counter()
    for cell in cells:
        chosen = {name.strip().lower() for name in cell.split(";") if name.strip()}
        unknown = sorted(chosen - set(index))
        if unknown:
            raise malformed(path, lineno, f"label(s) {unknown} are not in label_names.txt")
        votes.update(index[name] for name in chosen)
    return [vocabulary[i] for i in sorted(i for i, n in votes.items() if n >= MAJORITY)]


def canonical_emotions(expressions: list[str]) -> list[str]:
    return list(dict.fromkeys(EMOTION_SYNONYMS[e.lower()] for e in expressions if e.lower() in EMOTION_SYNONYMS))


def _entries(base: Path, path: Path, vocabulary: list[str],
             split: str, test_fraction: float, seed: int) -> Iterator[Entry]:
    rows = csv_rows(path)
    header = next(rows, None)
    if header is None or len(header[1]) != 1 + ANNOTATORS or header[1][0].lower() != "image":
        raise malformed(path, 1, f"expected the header 'image,annotator_1,annotator_2,annotator_3', got {header}")
    for lineno, row in rows:
        row += [""] * (1 + ANNOTATORS - len(row))  # a CSV writer may drop trailing empty cells
        if len(row) != 1 + ANNOTATORS or not row[0]:
            raise malformed(path, lineno, f"expected 'image,annotator_1,annotator_2,annotator_3', got {row}")
        expressions = majority_labels(row[1:], vocabulary, path, lineno)
        if in_split(split, image_in_test(row[0], test_fraction, seed)):
            labels = still_labels(DATASET, None, canonical_emotions(expressions), expressions=expressions)
            yield record_key(DATASET, Path(row[0]).with_suffix("").as_posix()), base / "images" / row[0], labels


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = 0.0, split_seed: int = 0,
            max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """FaceME images as records with their majority labels (``subsample`` has no effect: still images)."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction)
    base = release_root(require_root(root, DATASET, EXPECTED), DATASET, "annotations.csv")
    vocabulary = read_vocabulary(require_file(base / "label_names.txt", DATASET, "the label names, one per line"))
    path = require_file(base / "annotations.csv", DATASET, "rows 'image,annotator_1,annotator_2,annotator_3'")
    entries = _entries(base, path, vocabulary, split, test_fraction, split_seed)
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="emotion"), Skips(DATASET, max_skipped))
