"""Your own faces → records: a label table with one row per image (``make_shards table --table FILE``).

The table is a CSV, TSV, XLSX (first sheet), JSONL or parquet file, local or on any fsspec URL, streamed row by row
(expblip.data.sources._rows). Its columns are named by options or found by their names (case, spaces and dashes
ignored; ``AUTO`` lists the names tried):

    image      image, path, file, filename, img, url     a path relative to --root (default: the table's folder),
                                                           an absolute path, or a URL (s3://..., read through fsspec)
    aus        aus, au, action_units                      AU numbers: "1,2,12", "AU1 AU12", [1, 2, 12]; "0" or
                                                           "none" = labelled, no AU active; empty = not labelled
    AU columns AU01, AU1, au_1, AU 1, AU01_c, AU01_r      one column per AU: 0/1, or intensities with
                                                           --au-threshold T (present when >= T, as DISFA's 2);
                                                           OpenFace's _c (presence) is read, or _r with a threshold
    emotion    emotion, emotions, expression              names (happiness, happy, ...; "happy,surprised" for
                                                           two) or codes with --emotion-map (a file of "code,name"
                                                           lines or a JSON object, or affectnet / rafdb_basic)
    caption    caption, captions, text, description       captions as given (several columns: comma-separated)
    subject    subject, subject_id, participant, person
    frame      frame, frame_id, frame_number
    split      split, partition, subset                   train or test (val/validation count as test)

A row may carry any subset of AUs, emotions and captions; without a caption its captions come from its labels
(``--caption-style auto`` = ``concat``: the AU sentence, the emotion sentence, or both). A column option set to
``none`` turns that column off. Bad *data* is skipped and counted (expblip.data.sources._common.Skips): a missing
image, an unreadable or truncated one, a row with no label at all, a duplicate image. Bad *labels* stop the
conversion with a :class:`LabelError` naming the row, the value and the fix (an AU number expblip does not know, an
unknown emotion, an intensity in a 0/1 column); ``lenient`` (make_shards --check) counts them instead.

Labels: ``aus``, ``emotions``, ``subject``, ``frame``, ``image`` (the row's reference), ``au_intensity`` (with
--au-threshold). Split: the split column, else per subject (or per image without subjects) by
``sha256(f"{split_seed}:{subject}") < test_fraction`` (default 0: every row is train).
"""

from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Any

from PIL import Image

from expblip.data.captions import CaptionConfig, captions_for
from expblip.data.facs import AUS, DATASET_CODE_BASE, DATASET_EMOTIONS, EMOTIONS
from expblip.data.sources._common import ConversionError, DeferredImage, Skips, check_split, image_in_test, record_key
from expblip.data.sources._rows import Table, TableError, open_table

DATASET = "table"
EXPECTED = ("a CSV, TSV, XLSX, JSONL or parquet table (--table FILE) with one row per image: an image column "
            "(paths relative to --root) and AU, emotion or caption columns (docs/datasets.md, 'Your own table')")
AUTO: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "path", "file", "filename", "file_name", "img", "url", "image_url"),
    "aus": ("aus", "au", "action_units", "au_list"),
    "emotion": ("emotion", "emotions", "expression", "emotion_label"),
    "caption": ("caption", "captions", "text", "description"),
    "subject": ("subject", "subject_id", "participant", "person"),
    "frame": ("frame", "frame_id", "frame_number"),
    "split": ("split", "partition", "subset"),
}
EMOTION_ALIASES = {"happy": "happiness", "joy": "happiness", "sad": "sadness", "angry": "anger",
                   "surprised": "surprise", "fearful": "fear", "afraid": "fear", "scared": "fear",
                   "disgusted": "disgust", "contemptuous": "contempt", "calm": "neutral"}
SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "test",
          "valid": "test", "validation": "test"}
NO_AU = ("0", "none", "-")  # in an AU list: labelled, no AU active
_PER_AU = re.compile(r"^au[\s_-]*0*(\d+)(?:_([cr]))?$", re.IGNORECASE)  # AU01, AU1, au_1, AU 1, AU01_c, AU01_r
_AU_TOKEN = re.compile(r"^(?:au)?\s*0*(\d+)$", re.IGNORECASE)
_LIST_SPLIT = re.compile(r"[,;+|\s]+")
_EMOTION_SPLIT = re.compile(r"[,;+|]+")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class LabelError(ConversionError):
    """A row whose labels cannot be read: the conversion stops (no manifest); ``reason`` is how a check counts it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class TableOptions:
    """The table source's options (make_shards --table ...); a column left None is found by its name (AUTO)."""

    table: str = ""  # the label table: .csv, .tsv, .xlsx, .jsonl or .parquet (local path or fsspec URL)
    image_column: str | None = None  # image paths, relative to --root, absolute, or URLs
    aus_column: str | None = None  # AU numbers per row ("1,2,12"); "none": no list column
    emotion_column: str | None = None  # emotion names, or codes with emotion_map
    caption_column: str | None = None  # one or more columns of given captions, comma-separated
    subject_column: str | None = None
    frame_column: str | None = None
    split_column: str | None = None  # train / test per row
    au_threshold: float | None = None  # per-AU columns hold intensities: present when >= this (DISFA: 2)
    emotion_map: str | None = None  # a file of "code,name" lines (or a JSON object), or affectnet / rafdb_basic
    ignore_columns: str = ""  # comma-separated columns never read as labels (e.g. OpenFace's AU45_c)
    name: str = DATASET  # labels["dataset"] and the record keys' prefix

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"--name must be letters, digits, _ or -, got {self.name!r}")
        if self.au_threshold is not None and self.au_threshold <= 0:
            raise ValueError(f"--au-threshold must be > 0 (e.g. 2 for intensities 0-5), got {self.au_threshold}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TableOptions:
        """The options among ``options`` (a source's keyword arguments); the others are not the table's."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


@dataclass
class Columns:
    """Which column holds what, resolved against the table's header."""

    image: str
    aus: str | None = None
    per_au: dict[int, str] = field(default_factory=dict)  # AU number → its column
    emotion: str | None = None
    captions: list[str] = field(default_factory=list)
    subject: str | None = None
    frame: str | None = None
    split: str | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.aus or self.per_au or self.emotion or self.captions)


# ---------------------------------------------------------------- columns


def _norm(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _named(table: Table, given: str, option: str) -> str:
    """The column ``given`` names (exactly, else ignoring case); TableError listing the columns found."""
    by_norm = {_norm(c): c for c in table.columns}
    if given in table.columns or _norm(given) in by_norm:
        return given if given in table.columns else by_norm[_norm(given)]
    raise TableError(f"table {table.path}: no column {given!r} ({option}); the columns are {table.columns}. Pass "
                     f"{option} with one of them (or {option} none)")


def pick(table: Table, kind: str, given: str | None, skip: set[str]) -> str | None:
    """The column of ``kind``: the one ``given`` names, none for "none", else the first AUTO name present."""
    option = f"--{kind}-column"
    if given is not None:
        return None if given.strip().lower() == "none" else _named(table, given, option)
    by_norm = {_norm(c): c for c in table.columns if c not in skip}
    return next((by_norm[n] for n in AUTO[kind] if n in by_norm), None)


def per_au_columns(table: Table, skip: set[str], threshold: float | None) -> dict[int, str]:
    """{AU: column} of the one-column-per-AU headers; with both OpenFace _c and _r, _r only with a threshold."""
    found: dict[int, dict[str, str]] = {}
    for column in table.columns:
        match = _PER_AU.match(column.strip())
        if column in skip or not match:
            continue
        au = int(match.group(1))
        if au not in AUS:
            raise TableError(f"table {table.path}: column {column!r} names AU {au}, which expblip does not know "
                             f"(known AUs: {sorted(AUS)}); drop it or pass --ignore-columns {column}")
        found.setdefault(au, {})[(match.group(2) or "").lower()] = column
    order = ("r", "", "c") if threshold is not None else ("c", "", "r")
    return {au: next(kinds[k] for k in order if k in kinds) for au, kinds in sorted(found.items())}


def resolve_columns(table: Table, opts: TableOptions) -> Columns:
    """The table's columns for each label; TableError naming the columns found when one is missing or misnamed."""
    ignored = {c.strip() for c in opts.ignore_columns.split(",") if c.strip()}
    image = pick(table, "image", opts.image_column, ignored)
    if image is None:
        raise TableError(f"table {table.path}: no image column (looked for {', '.join(AUTO['image'])}); the columns "
                         f"are {table.columns}. Name it with --image-column")
    cols = Columns(image=image)
    for kind in ("aus", "emotion", "subject", "frame", "split"):
        setattr(cols, kind, pick(table, kind, getattr(opts, f"{kind}_column"), ignored | {image}))
    cols.captions = _caption_columns(table, opts.caption_column, ignored)
    used = {image, *cols.captions, *(getattr(cols, k) for k in ("aus", "emotion", "subject", "frame", "split"))}
    cols.per_au = per_au_columns(table, ignored | used, opts.au_threshold)
    if cols.aus and cols.per_au:
        raise TableError(f"table {table.path}: AUs in both the list column {cols.aus!r} and the per-AU columns "
                         f"{sorted(cols.per_au.values())}; keep one (--aus-column none, or --ignore-columns)")
    if not cols.labelled:
        raise TableError(f"table {table.path}: no label column: expected an AU list (aus), per-AU columns (AU01, "
                         f"...), an emotion or a caption column; the columns are {table.columns}. Name yours with "
                         f"--aus-column, --emotion-column or --caption-column")
    return cols


def _caption_columns(table: Table, given: str | None, skip: set[str]) -> list[str]:
    if given is None:
        found = pick(table, "caption", None, skip)
        return [found] if found else []
    if given.strip().lower() == "none":
        return []
    return [_named(table, name.strip(), "--caption-column") for name in given.split(",") if name.strip()]


# ---------------------------------------------------------------- cells


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any) -> float | None:
    """A cell as a number (bool, int, float, numeric text), else None."""
    if isinstance(value, bool | int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _text(value: Any) -> str:
    """A cell as text; 3.0 (a spreadsheet's integer) → "3"."""
    number = _number(value) if not isinstance(value, str) else None
    return str(int(number)) if number is not None and number.is_integer() else str(value).strip()


def _tokens(value: Any, splitter: re.Pattern) -> list[str]:
    items = value if isinstance(value, list | tuple) else splitter.split(_text(value).strip("[]"))
    return [t for t in (_text(v).strip("'\" ") for v in items) if t]


def parse_aus(value: Any, where: str, column: str) -> list[int]:
    """An AU list cell → sorted AU numbers; LabelError naming the row and value for an unknown or malformed one."""
    tokens = _tokens(value, _LIST_SPLIT)
    if len(tokens) == 1 and tokens[0].lower() in NO_AU:
        return []
    aus = set()
    for token in tokens:
        match = _AU_TOKEN.match(token)
        if not match:
            raise LabelError("bad AU value", f"{where}: {token!r} in column {column!r} is not an AU number; write "
                             "AUs as '1,2,12' (or 'none' for no AU)")
        au = int(match.group(1))
        if au not in AUS:
            raise LabelError("unknown AU number", f"{where}: AU {au} in column {column!r} is not an AU expblip "
                             f"knows ({sorted(AUS)}); correct the row or remove {au}")
        aus.add(au)
    return sorted(aus)


def per_au_labels(row: dict, columns: dict[int, str], threshold: float | None, where: str
                  ) -> tuple[list[int] | None, dict[str, float] | None]:
    """(present AUs, intensities) from one column per AU; (None, None) when every cell is empty (not coded)."""
    values: dict[int, float] = {}
    for au, column in columns.items():
        cell = row.get(column)
        if _blank(cell):
            continue
        number = _number(cell)
        if number is None or (threshold is None and number not in (0, 1)):
            hint = ("per-AU columns hold 0 or 1; for intensities pass --au-threshold (e.g. 2, as DISFA)"
                    if threshold is None else "an intensity must be a number")
            raise LabelError("bad AU value", f"{where}: column {column!r} = {cell!r}: {hint}")
        values[au] = number
    if not values:
        return None, None
    present = sorted(au for au, v in values.items() if v >= (threshold if threshold is not None else 1))
    intensity = {str(au): v for au, v in values.items()} if threshold is not None else None
    return present, intensity


def load_emotion_map(spec: str | None) -> dict[str, str] | None:
    """{code text: emotion name} from a dataset name in facs.DATASET_EMOTIONS, a JSON object or "code,name" lines."""
    if spec is None:
        return None
    if spec in DATASET_EMOTIONS:
        base = DATASET_CODE_BASE[spec]
        return {str(i + base): name for i, name in enumerate(DATASET_EMOTIONS[spec])}
    from expblip.data.shards import url_to_fs

    fs, path = url_to_fs(spec)
    if not fs.isfile(path):
        raise FileNotFoundError(f"--emotion-map {spec} does not exist; pass a file of 'code,name' lines (or a JSON "
                                f"object), or one of {sorted(DATASET_EMOTIONS)}")
    text = fs.cat_file(path).decode("utf-8-sig")
    pairs = json.loads(text).items() if text.lstrip().startswith("{") else _map_lines(text, spec)
    mapping = {_text(code): str(name).strip().lower() for code, name in pairs}
    for code, name in mapping.items():
        if EMOTION_ALIASES.get(name, name) not in EMOTIONS:
            raise ValueError(f"--emotion-map {spec}: code {code} maps to {name!r}, not an emotion; use one of "
                             f"{list(EMOTIONS)}")
    return {code: EMOTION_ALIASES.get(name, name) for code, name in mapping.items()}


def _map_lines(text: str, spec: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in re.split(r"[,\t:=]|\s+", line.strip(), maxsplit=1)]
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"--emotion-map {spec}:{lineno}: expected 'code,name', got {line.strip()!r}")
        yield parts[0], parts[1]


def parse_emotions(value: Any, where: str, column: str, codes: dict[str, str] | None) -> list[str]:
    """An emotion cell → canonical names (facs.EMOTIONS); LabelError naming the row, the value and the fix."""
    names = []
    for token in _tokens(value, _EMOTION_SPLIT):
        if _number(token) is not None:
            if codes is None:
                raise LabelError("unknown emotion", f"{where}: emotion {token!r} in column {column!r} is a code: "
                                 "pass --emotion-map FILE ('code,name' lines) or --emotion-map affectnet")
            if token not in codes:
                raise LabelError("unknown emotion", f"{where}: emotion code {token} in column {column!r} is not in "
                                 f"--emotion-map (codes {sorted(codes)}); add it there or correct the row")
            name = codes[token]
        else:
            name = EMOTION_ALIASES.get(token.lower(), token.lower())
        if name not in EMOTIONS:
            raise LabelError("unknown emotion", f"{where}: unknown emotion {token!r} in column {column!r}; use one "
                             f"of {list(EMOTIONS)} (or happy, sad, angry, ...), or codes with --emotion-map")
        names.append(name)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- images


def image_location(root: str, ref: str) -> str:
    """Where a row's image is: a URL or absolute path as given, else ``root/ref``."""
    from expblip.data.shards import join_url

    return ref if "://" in ref or os.path.isabs(ref) else join_url(root, ref)


def read_image(location: str, skips: Skips, where: str = "") -> bytes | Image.Image | None:
    """PNG/JPEG bytes as stored, other formats PIL can read as an RGB image (written as PNG); None (counted) for
    a missing, unreadable or truncated file. Every image is decoded once here, so a broken one never reaches a
    shard. In a parallel conversion (``skips`` deferring) a worker does all this: a DeferredImage is returned."""
    from expblip.data.shards import url_to_fs

    if skips.deferral is not None:  # expblip.data.sources.parallel: the worker reads, checks and counts in order
        return DeferredImage(functools.partial(read_image, location, where=where), skips)

    detail = f"{where}: {location}" if where else location
    try:
        fs, path = url_to_fs(location)
        data = fs.cat_file(path)
    except FileNotFoundError:
        skips.add("missing image", detail)
        return None
    except (OSError, ValueError) as exn:
        skips.add("unreadable image", f"{detail} ({exn})")
        return None
    return decode_image(data, skips, detail)


def decode_image(data: bytes, skips: Skips, detail: str) -> bytes | Image.Image | None:
    """PNG/JPEG ``data`` as it is, other formats as an RGB image; None (counted) for a truncated or corrupt one."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # raises on a truncated or corrupt file
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        skips.add("unreadable image", f"{detail} ({exn})")
        return None
    return data if image.format in ("PNG", "JPEG") else image.convert("RGB")


def record_key_for(name: str, ref: str) -> str:
    """``name-<the image reference without scheme and extension>``: the same row gives the same key in any format."""
    path = ref.split("://", 1)[-1]
    return record_key(name, posixpath.splitext(path)[0])


# ---------------------------------------------------------------- rows → records


@dataclass
class TableReader:
    """One pass over a table: each row becomes a record, or is skipped and counted, or (a bad label) stops it."""

    table: Table
    columns: Columns
    opts: TableOptions
    root: str  # the base of relative image paths: --root, else the table's folder
    caption: CaptionConfig
    skips: Skips
    split: str = "train"
    test_fraction: float = 0.0  # without a split column: the share of subjects (or images) in test
    split_seed: int = 0
    limit: int | None = None  # read at most this many rows (make_shards --check N)
    lenient: bool = False  # count bad labels (Skips.fail) instead of stopping
    codes: dict[str, str] | None = None  # emotion code → name (--emotion-map)

    def __iter__(self) -> Iterator[dict]:
        kept, seen = 0, set()
        for where, row in islice(self.table.rows, self.limit):
            try:
                record = self.record(where, row, seen)
            except LabelError as err:
                if not self.lenient:
                    raise
                self.skips.fail(err.reason, str(err))
                continue
            if record is not None:
                kept += 1
                yield record
        self.skips.finish(kept)

    def record(self, where: str, row: dict, seen: set[str]) -> dict | None:
        """The row's record; None when it is outside the split or skipped (counted)."""
        cell = row.get(self.columns.image)
        ref = None if _blank(cell) else _text(cell)
        labels = self.labels(where, row, ref)
        given = self.given_captions(row)
        if not self.in_split(where, row, ref, labels["subject"]):
            return None
        if ref is None or (labels["aus"] is None and labels["emotions"] is None and not given):
            self.skips.add("no image path" if ref is None else "no label", where)
            return None
        key = record_key_for(self.opts.name, ref)
        if key in seen:
            self.skips.add("duplicate entry", f"{where}: {ref}")
            return None
        seen.add(key)
        image = self.image(where, row, ref)
        if image is None:
            return None
        return {"key": key, "image": image, "labels": labels, "captions": given or captions_for(labels, self.caption)}

    def image(self, where: str, row: dict, ref: str) -> bytes | Image.Image | None:
        """The row's image (None: skipped and counted); a reader of rows that carry their images overrides it."""
        return read_image(image_location(self.root, ref), self.skips, where)

    def labels(self, where: str, row: dict, ref: str | None) -> dict:
        cols = self.columns
        aus, intensity = None, None
        if cols.aus and not _blank(row.get(cols.aus)):
            aus = parse_aus(row[cols.aus], where, cols.aus)
        elif cols.per_au:
            aus, intensity = per_au_labels(row, cols.per_au, self.opts.au_threshold, where)
        emotions = None
        if cols.emotion and not _blank(row.get(cols.emotion)):
            emotions = parse_emotions(row[cols.emotion], where, cols.emotion, self.codes) or None
        subject = None if not cols.subject or _blank(row.get(cols.subject)) else _text(row[cols.subject])
        labels = {"aus": aus, "emotions": emotions, "dataset": self.opts.name, "subject": subject,
                  "frame": self.frame(where, row), "image": ref}
        if intensity is not None:
            labels["au_intensity"] = intensity
        return labels

    def frame(self, where: str, row: dict) -> int | None:
        column = self.columns.frame
        if not column or _blank(row.get(column)):
            return None
        number = _number(row[column])
        if number is None or not number.is_integer():
            raise LabelError("bad frame", f"{where}: frame {row[column]!r} in column {column!r} is not an integer "
                             "frame number; correct it (or pass --frame-column none)")
        return int(number)

    def given_captions(self, row: dict) -> list[str]:
        out: list[str] = []
        for column in self.columns.captions:
            cell = row.get(column)
            items = cell if isinstance(cell, list | tuple) else [cell]
            out += [str(c).strip() for c in items if not _blank(c)]
        return list(dict.fromkeys(out))

    def in_split(self, where: str, row: dict, ref: str | None, subject: str | None) -> bool:
        """The split column's word, else the seeded per-subject (per-image) rule; every row is train by default."""
        if self.split == "all":
            return True
        column = self.columns.split
        if column:
            word = "" if _blank(row.get(column)) else _text(row[column]).lower()
            if word not in SPLITS:
                raise LabelError("bad split", f"{where}: split {row.get(column)!r} in column {column!r}: use train "
                                 "or test (val counts as test), or pass --split-column none")
            return SPLITS[word] == self.split
        is_test = self.test_fraction > 0 and image_in_test(subject or ref or where, self.test_fraction,
                                                           self.split_seed)
        return (self.split == "test") == is_test


def require_table(table: str, root: str) -> str:
    """The table's path; FileNotFoundError naming what was expected (a missing table file: open_table)."""
    if root and "://" not in root and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"{DATASET}: image root {root} is not a directory; expected {EXPECTED}")
    if not table:
        raise FileNotFoundError(f"{DATASET}: no table given (--table FILE) for the images under "
                                f"{root or 'its folder'}; expected {EXPECTED}")
    return table


def records(root: str = "", split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = 0.0, split_seed: int = 0, max_skipped: float | None = None,
            limit: int | None = None, lenient: bool = False, **options: Any) -> Iterator[dict]:
    """The rows of a label table as records (``options``: TableOptions' fields; ``subsample`` has no effect)."""
    from expblip.data.shards import parent_url

    check_split(split, DATASET)
    opts = TableOptions.from_options(options)
    table = open_table(require_table(opts.table, root))
    columns = resolve_columns(table, opts)
    if columns.split and test_fraction:
        raise ValueError(f"table {table.path} has a split column ({columns.split!r}): drop --test-fraction, or "
                         "pass --split-column none to split by --test-fraction instead")
    if split == "test" and not columns.split and not test_fraction:
        raise ValueError(f"table {table.path}: split 'test' is empty: the table has no split column (train/test); "
                         "add one or pass --test-fraction (e.g. 0.1)")
    reader = TableReader(table, columns, opts, root=root or parent_url(opts.table),
                         caption=caption or CaptionConfig("concat"), skips=Skips(opts.name, max_skipped), split=split,
                         test_fraction=test_fraction, split_seed=split_seed, limit=limit, lenient=lenient,
                         codes=load_emotion_map(opts.emotion_map))
    return iter(reader)
