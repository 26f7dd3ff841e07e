"""EmotioNet (manually annotated part only) → records (11 AUs: 1 2 4 5 6 9 12 17 20 25 26).

Expected layout::

    ROOT/emotionet_manual.csv       the manual-annotation spreadsheet (distributed as .xlsx) saved as CSV
    ROOT/images/<file name>         the downloaded images, named by the last path component of their URL

CSV: a header row with an image column named ``URL`` (the release's; the local file is ``ROOT/images/`` + the
URL's file name) or ``image`` / ``path`` (a path relative to ROOT), and one column per AU named ``AU1`` / ``AU 1`` /
``AU01`` (other columns, e.g. ``URL orig``, are ignored). AU cells are 0 (absent), 1 (present) or 999 (unknown).
An unknown AU is *not labelled*: it is left out of ``aus`` and listed in ``aus_unknown``; a row whose subset AUs are
all unknown is skipped (counted). Every AU of the subset needs a column.

Labels: ``aus`` (subset), ``aus_unknown``. Split: per image, ``sha256(f"{split_seed}:{image}") < test_fraction``
(default 0.1, about the paper's 2,117 of 21,163).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from expblip.data.captions import CaptionConfig
from expblip.data.facs import DATASET_AUS
from expblip.data.sources._common import (
    Entry,
    Skips,
    au_column,
    check_split,
    csv_rows,
    image_in_test,
    in_split,
    malformed,
    parse_int,
    record_key,
    require_file,
    require_root,
    require_test_part,
    still_image_records,
    still_labels,
)

DATASET = "emotionet"
LABEL_FILE = "emotionet_manual.csv"
EXPECTED = f"ROOT/{LABEL_FILE} (the manual-annotation XLSX saved as CSV) and ROOT/images/<file name>"
TEST_FRACTION = 0.1
UNKNOWN = 999
_IMAGE_COLUMNS = ("url", "image", "path")


def _columns(path: Path, header: list[str]) -> tuple[int, dict[int, int]]:
    """(index of the image column, {AU: column index}) for the subset; missing columns raise."""
    lowered = [h.lower() for h in header]
    image_col = next((lowered.index(c) for c in _IMAGE_COLUMNS if c in lowered), None)
    if image_col is None:
        raise malformed(path, 1, f"no image column: expected one named URL, image or path, got {header}")
    columns = {au_column(h): i for i, h in enumerate(header) if h.upper().startswith("AU") and au_column(h)}
    missing = [au for au in DATASET_AUS[DATASET] if au not in columns]
    if missing:
        raise malformed(path, 1, f"no column for AU {missing} (expected headers like AU1 or 'AU 1')")
    return image_col, {au: columns[au] for au in DATASET_AUS[DATASET]}


def _image_path(base: Path, ref: str) -> Path:
    if "://" in ref:
        return base / "images" / unquote(posixpath.basename(urlparse(ref).path))
    return base / ref


def _key(ref: str) -> str:
    stem = Path(unquote(urlparse(ref).path)).stem  # the file name, plus a hash: names repeat across sites
    return record_key(DATASET, stem[-40:], hashlib.sha1(ref.encode()).hexdigest()[:10])


def _row_labels(path: Path, lineno: int, row: list[str], au_cols: dict[int, int]) -> tuple[list[int], list[int]]:
    """(present AUs, unknown AUs) of one row."""
    present, unknown = [], []
    for au, col in au_cols.items():
        value = parse_int(row[col], path, lineno, f"AU{au} value")
        if value not in (0, 1, UNKNOWN):
            raise malformed(path, lineno, f"AU{au} must be 0, 1 or {UNKNOWN} (unknown), got {value}")
        (present if value == 1 else unknown if value == UNKNOWN else []).append(au)
    return present, unknown


def _entries(base: Path, path: Path,
             split: str, test_fraction: float, seed: int, skips: Skips) -> Iterator[Entry]:
    rows = csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise malformed(path, 1, "empty file: expected a header row (URL, AU1, AU2, ...)")
    image_col, au_cols = _columns(path, first[1])
    for lineno, row in rows:
        if len(row) != len(first[1]):
            raise malformed(path, lineno, f"{len(row)} cells, the header has {len(first[1])}")
        ref = row[image_col]
        if not ref:
            raise malformed(path, lineno, "empty image reference")
        present, unknown = _row_labels(path, lineno, row, au_cols)
        if len(unknown) == len(au_cols):
            skips.add(f"every AU unknown ({UNKNOWN})", f"{path.name} line {lineno}")
            continue
        if in_split(split, image_in_test(ref, test_fraction, seed)):
            yield _key(ref), _image_path(base, ref), still_labels(DATASET, present, aus_unknown=unknown)


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0, **_: object) -> Iterator[dict]:
    """EmotioNet's manually labelled images as records (``subsample`` has no effect: still images)."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction)
    base = require_root(root, DATASET, EXPECTED)
    path = require_file(base / LABEL_FILE, DATASET, "the manual-annotation spreadsheet saved as CSV (URL, AU1, ...)")
    skips = Skips(DATASET)
    entries = _entries(base, path, split, test_fraction, split_seed, skips)
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="au"), skips)
