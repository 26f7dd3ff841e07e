"""EmotioNet (manually annotated part only) → records (11 AUs: 1 2 4 5 6 9 12 17 20 25 26).

Layouts read (docs/datasets.md cites the public readers)::

    ROOT/EmotioNet_FACS_aws_2020_24600.csv    the release's manual-annotation table, or its .xlsx (every sheet);
                                              any EmotioNet_FACS*.csv/.xlsx (or emotionet_manual.csv) in ROOT or
                                              one level down (py-feat's tutorial keeps it in ROOT/labels/)
    ROOT/images/<file name>                   the downloaded images, named by the last component of their URL
                                              (imgs/ — py-feat's — and Images/ work too, as does the URL's own
                                              path mirrored below one of them, or the images in ROOT itself)

Table: a header row with an image column named ``URL`` (the release's; ``URL orig`` is ignored) or ``image`` /
``path`` (a path relative to ROOT), and one column per AU. The release quotes its headers and URLs with single
quotes (``'AU 1'``, ``'http://.../x.jpg'``): quotes and spaces around names and cells are dropped, so ``AU1``,
``AU 1``, ``'AU 1'`` and ``AU01`` all name AU 1. AU cells are 0 (absent), 1 (present) or 999 (unknown; an empty
cell counts as unknown too). An unknown AU is *not labelled*: it is left out of ``aus`` and listed in
``aus_unknown``; a row whose subset AUs are all unknown is left out by rule (counted). Every AU of the subset needs
a column.

Labels: ``aus`` (subset), ``aus_unknown``. Split: per image, ``sha256(f"{split_seed}:{url}") < test_fraction``
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
    _subdirs,
    au_column,
    check_split,
    csv_rows,
    image_in_test,
    in_split,
    malformed,
    record_key,
    require_root,
    require_test_part,
    still_image_records,
    still_labels,
)

DATASET = "emotionet"
RELEASE_FILE = "EmotioNet_FACS_aws_2020_24600"
LEGACY_FILE = "emotionet_manual.csv"
EXPECTED = f"ROOT/{RELEASE_FILE}.csv (or .xlsx) and ROOT/images/<file name>"
TEST_FRACTION = 0.1
UNKNOWN = 999
IMAGE_DIRS = ("images", "imgs", "Images", "img")
_IMAGE_COLUMNS = ("url", "image", "path")
_QUOTES = "'\" \t"


def clean(cell: object) -> str:
    """A table cell as text without the release's quotes and padding; 1.0 (an XLSX number) → "1"."""
    if cell is None:
        return ""
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)
    return str(cell).strip(_QUOTES)


def _is_table(path: Path) -> bool:
    name = path.name
    return name == LEGACY_FILE or (name.startswith("EmotioNet_FACS") and name.endswith((".csv", ".xlsx")))


def label_file(base: Path) -> Path:
    """The manual-annotation table in ROOT or one level down; a CSV wins over an XLSX of the same name."""
    folders = [base, *_subdirs(base)]
    found = sorted(p for folder in folders for p in folder.iterdir() if p.is_file() and _is_table(p))
    by_stem: dict[Path, list[Path]] = {}
    for path in found:
        by_stem.setdefault(path.with_suffix(""), []).append(path)
    chosen = [next((p for p in paths if p.suffix == ".csv"), paths[0]) for paths in by_stem.values()]
    if not chosen:
        raise FileNotFoundError(f"{DATASET}: no manual-annotation table ({RELEASE_FILE}.csv or .xlsx) in {base} or "
                                f"one level down; expected {EXPECTED} (docs/datasets.md)")
    if len(chosen) > 1:
        raise ValueError(f"{DATASET}: {len(chosen)} annotation tables: {', '.join(map(str, chosen))}; keep one")
    return chosen[0]


def table_rows(path: Path) -> Iterator[tuple[str, int, list[str]]]:
    """(sheet or "", row number, cleaned cells) of the non-blank rows of a CSV or of every XLSX sheet."""
    if path.suffix.lower() != ".xlsx":
        for lineno, row in csv_rows(path):
            yield "", lineno, [clean(c) for c in row]
        return
    from openpyxl import load_workbook  # only for the release's XLSX

    book = load_workbook(path, read_only=True, data_only=True)
    try:
        for sheet in book.worksheets:
            for rowno, row in enumerate(sheet.iter_rows(values_only=True), 1):
                cells = [clean(c) for c in row]
                while cells and not cells[-1]:
                    cells.pop()
                if cells:
                    yield sheet.title, rowno, cells
    finally:
        book.close()


def _columns(where: str, header: list[str]) -> tuple[int, dict[int, int]]:
    """(index of the image column, {AU: column index}) for the subset; missing columns raise."""
    lowered = [h.lower() for h in header]
    image_col = next((lowered.index(c) for c in _IMAGE_COLUMNS if c in lowered), None)
    if image_col is None:
        raise ValueError(f"{where}: no image column: expected one named URL, image or path, got {header}")
    columns = {au_column(h): i for i, h in enumerate(header) if h.upper().startswith("AU") and au_column(h)}
    missing = [au for au in DATASET_AUS[DATASET] if au not in columns]
    if missing:
        raise ValueError(f"{where}: no column for AU {missing} (expected headers like AU1, 'AU 1' or AU01)")
    return image_col, {au: columns[au] for au in DATASET_AUS[DATASET]}


def image_path(base: Path, folders: list[Path], ref: str) -> Path:
    """Where the image of ``ref`` (a URL or a ROOT-relative path) lies; the first candidate when none exists."""
    if "://" not in ref:
        return base / ref
    url_path = unquote(urlparse(ref).path).lstrip("/")
    name = posixpath.basename(url_path)
    candidates = [folder / name for folder in folders] + [folder / url_path for folder in folders]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _key(ref: str) -> str:
    stem = Path(unquote(urlparse(ref).path)).stem  # the file name, plus a hash: names repeat across sites
    return record_key(DATASET, stem[-40:], hashlib.sha1(ref.encode()).hexdigest()[:10])


def _code(text: str, where: str, au: int) -> int:
    if not text:
        return UNKNOWN
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: AU{au} must be 0, 1 or {UNKNOWN} (unknown), got {text!r}") from None
    if value not in (0, 1, UNKNOWN):
        raise ValueError(f"{where}: AU{au} must be 0, 1 or {UNKNOWN} (unknown), got {text!r}")
    return int(value)


def _row_labels(where: str, row: list[str], au_cols: dict[int, int]) -> tuple[list[int], list[int]]:
    """(present AUs, unknown AUs) of one row."""
    codes = {au: _code(row[col] if col < len(row) else "", where, au) for au, col in au_cols.items()}
    return ([au for au, v in codes.items() if v == 1], [au for au, v in codes.items() if v == UNKNOWN])


def _entries(base: Path, path: Path, split: str, test_fraction: float, seed: int, skips: Skips) -> Iterator[Entry]:
    folders = [base / d for d in IMAGE_DIRS if (base / d).is_dir()] + [base]
    columns: dict[str, tuple[int, dict[int, int]]] = {}  # per sheet: each XLSX sheet has its own header row
    for sheet, rowno, row in table_rows(path):
        where = f"{path}{f'[{sheet}]' if sheet else ''}:{rowno}"
        if sheet not in columns:
            columns[sheet] = _columns(where, row)
            continue
        image_col, au_cols = columns[sheet]
        ref = row[image_col] if image_col < len(row) else ""
        if not ref:
            raise malformed(path, rowno, f"empty image reference{f' (sheet {sheet})' if sheet else ''}")
        present, unknown = _row_labels(where, row, au_cols)
        if len(unknown) == len(au_cols):
            skips.drop(f"every AU unknown ({UNKNOWN})", f"{path.name} row {rowno}")
            continue
        if in_split(split, image_in_test(ref, test_fraction, seed)):
            yield _key(ref), image_path(base, folders, ref), still_labels(DATASET, present, aus_unknown=unknown)


def records(root: str, split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = TEST_FRACTION, split_seed: int = 0, max_skipped: float | None = None,
            **_: object) -> Iterator[dict]:
    """EmotioNet's manually labelled images as records (``subsample`` has no effect: still images)."""
    check_split(split, DATASET)
    require_test_part(DATASET, split, test_fraction)
    base = require_root(root, DATASET, EXPECTED)
    path = label_file(base)
    skips = Skips(DATASET, max_skipped)
    entries = _entries(base, path, split, test_fraction, split_seed, skips)
    return still_image_records(DATASET, entries, caption or CaptionConfig(style="au"), skips)
