"""RAF-AU → records (the 13 evaluated AUs: 1 2 4 5 6 9 10 12 16 17 25 26 27).

Expected layout (the release's own names)::

    ROOT/RAFAU_label.txt            one line per image: "<image name> <AU string>", e.g. "0001.jpg 1+2+L4+R12+25"
    ROOT/aligned/0001_aligned.jpg   aligned faces (default), or with aligned=False:
    ROOT/original/0001.jpg          the original images

AU string: AUs joined by ``+``; an AU may carry a region prefix L (left), R (right), T (top) or B (bottom), which is
dropped (``L4`` → AU 4); ``null`` means no AU. AUs outside the 13 evaluated are dropped too, so a face whose only AUs
lie outside the subset gets the no-AU caption. Trailing whitespace is ignored; anything else malformed raises.

Labels: ``aus`` (subset). Split: RAF-AU ships no official split; an image is test when
``sha256(f"{split_seed}:{name}")`` falls below ``test_fraction`` (default 0.2, about the paper's 868 of 4,601).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import (
    Entry,
    Skips,
    check_split,
    image_in_test,
    in_split,
    malformed,
    record_key,
    release_root,
    require_file,
    require_root,
    require_test_part,
    restrict_aus,
    still_image_records,
    still_labels,
    text_lines,
)

DATASET = "raf_au"
LABEL_FILE = "RAFAU_label.txt"
EXPECTED = f"ROOT/{LABEL_FILE} and ROOT/aligned/<name>_aligned.jpg (or ROOT/original/<name>)"
TEST_FRACTION = 0.2
_TOKEN = re.compile(r"^([LRTB]?)(\d+)$", re.IGNORECASE)


def parse_au_string(text: str, path: Path, lineno: int) -> list[int]:
    """"1+2+L4+R12+25" → [1, 2, 4, 12, 25] (all AUs, prefixes dropped); "null" → []."""
    if text.lower() == "null":
        return []
    aus = []
    for token in text.split("+"):
        match = _TOKEN.match(token.strip())
        if not match:
            raise malformed(path, lineno, f"AU token {token!r} is not [L|R|T|B]<number> (in {text!r})")
        aus.append(int(match.group(2)))
    return sorted(set(aus))


def _image_path(base: Path, name: str, aligned: bool) -> Path:
    if not aligned:
        return base / "original" / name
    stem = Path(name).stem
    path = base / "aligned" / f"{stem}_aligned.jpg"
    padded = base / "aligned" / f"{stem.zfill(4)}_aligned.jpg"  # some copies list "1.jpg" for 0001_aligned.jpg
    return padded if not path.exists() and padded.exists() else path


def _entries(base: Path, label_file: Path,
             split: str, test_fraction: float, seed: int, aligned: bool) -> Iterator[Entry]:
    for lineno, text in text_lines(label_file):
        fields = text.split()
        if len(fields) != 2:
            raise malformed(label_file, lineno, f"expected '<image name> <AU string>', got {text!r}")
        name, au_string = fields
        aus = restrict_aus(parse_au_string(au_string, label_file, lineno), DATASET)
        if in_split(split, image_in_test(name, test_fraction, seed)):
            yield record_key(DATASET, Path(name).stem), _image_path(base, name, aligned), still_labels(DATASET, aus)


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0, aligned: bool = True,
            max_skipped: float | None = None, **_: object) -> Iterator[dict]:
    """RAF-AU images as records (``subsample`` has no effect: still images)."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction)
    base = release_root(require_root(root, DATASET, EXPECTED), DATASET, LABEL_FILE)
    label_file = require_file(base / LABEL_FILE, DATASET, "lines '<image name> <AU string>', e.g. '0001.jpg 1+L4+25'")
    entries = _entries(base, label_file, split, test_fraction, split_seed, aligned)
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="au"), Skips(DATASET, max_skipped))
