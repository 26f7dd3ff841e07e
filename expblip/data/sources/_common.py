"""What every dataset converter shares: strict file access, split rules, lazy image bytes and skip accounting.

Conventions (docs/datasets.md says the same for users):

* A missing root, label file or image folder that the layout requires raises ``FileNotFoundError`` naming the path
  and what was expected there. A malformed label line raises ``ValueError("FILE:LINE: what is wrong")``.
* Bad *data* (a labelled image that is missing or is not PNG/JPEG, a duplicate entry, an AffectNet code 8-10) is
  skipped and counted: the first few of each kind are logged with their path, a summary when the source ends.
* Splits are ``train``, ``test`` or ``all``. Where a dataset ships an official split it is used; otherwise
  :func:`subject_split` (video datasets, subject-exclusive) or :func:`image_in_test` (still images) decides.
* Images are read one record at a time, when the record is built; nothing holds a dataset in memory.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expblip.data.captions import CaptionConfig, captions_for
from expblip.data.facs import DATASET_AUS

log = logging.getLogger("expblip.data.sources")

SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_AU_COLUMN = re.compile(r"^(?:AU)?\s*0*(\d+)$", re.IGNORECASE)  # "1", "AU1", "AU01", "AU 1"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # webdataset splits member names at the first dot
_WARN_FIRST = 3  # skipped records logged one by one, per reason; the rest only in the summary
EXAMPLES = 5  # bad rows named in a ConversionError
MAX_SKIPPED = 0.01  # a conversion fails when more than this fraction of its rows is bad data
DOCS = "see docs/datasets.md"
Entry = tuple[str, Path, dict]  # (record key, image path, labels) of one still image


# ---------------------------------------------------------------- files


def require_root(root: str | Path | None, dataset: str, expected: str) -> Path:
    """The dataset root as a Path; FileNotFoundError naming what was expected when it is missing."""
    if not root:
        raise FileNotFoundError(f"{dataset}: no dataset root given (pass --root DIR); expected {expected} ({DOCS})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: dataset root {path} is not a directory; expected {expected} ({DOCS})")
    return path


def require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: missing {path}; expected {what} ({DOCS})")
    return path


def require_dir(path: Path, dataset: str, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: missing directory {path}; expected {what} ({DOCS})")
    return path


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".rar", ".7z")
_SKIP_DIRS = ("__MACOSX",)  # the resource forks macOS zips carry


def find_dirs(base: Path, match: Callable[[Path], bool], max_depth: int = 3) -> list[Path]:
    """Directories under ``base`` (``base`` itself at depth 0) for which ``match`` holds, shallowest first.

    Breadth-first over directories only (``os.scandir``: no stat per file), never below a match, never into hidden
    folders; how the converters find a release's folders inside the extra levels downloads and unpacking add.
    """
    found, level = [], [base]
    for _depth in range(max_depth + 1):
        below = []
        for folder in level:
            if match(folder):
                found.append(folder)
                continue
            below += _subdirs(folder)
        level = below
    return found


def _subdirs(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
                          and e.name not in _SKIP_DIRS)
    except OSError:
        return []


def one_dir(base: Path, dataset: str, match: Callable[[Path], bool], what: str, max_depth: int = 3,
            expected: str = "") -> Path:
    """The single directory ``find_dirs`` finds; FileNotFoundError (with unpack hints) for none, ValueError for
    several (naming them: keep one)."""
    found = find_dirs(base, match, max_depth)
    if len(found) > 1:
        listed = ", ".join(str(p) for p in found[:4])
        raise ValueError(f"{dataset}: {len(found)} candidate {what} under {base}: {listed}; keep one of them "
                         f"(move or rename the others) ({DOCS})")
    if not found:
        raise FileNotFoundError(f"{dataset}: no {what} under {base} (searched {max_depth} levels down); expected "
                                f"{expected or what}{archive_hint(base)} ({DOCS})")
    return found[0]


def release_root(base: Path, dataset: str, marker: str, max_depth: int = 2) -> Path:
    """The folder holding ``marker`` (a release's label file): ROOT, or the one folder up to ``max_depth`` levels
    down that an unzipped download nests it in (``RAF-AU/RAF-AU/...``); ROOT when there is none (the caller then
    names the missing file)."""
    found = find_dirs(base, lambda p: (p / marker).is_file(), max_depth)
    if len(found) > 1:
        raise ValueError(f"{dataset}: {len(found)} copies of {marker} under {base}: "
                         f"{', '.join(str(p / marker) for p in found)}; keep one")
    return found[0] if found else base


def archives(base: Path, max_depth: int = 2) -> list[Path]:
    """Archive files (zip, tar, ...) at most ``max_depth`` levels under ``base``."""
    out, level = [], [base]
    for _depth in range(max_depth):
        for folder in level:
            out += [p for p in folder.iterdir() if p.name.lower().endswith(ARCHIVES) and p.is_file()]
        level = [sub for folder in level for sub in _subdirs(folder)]
    return sorted(set(out))


def unpack_command(archive: Path, target: Path) -> str:
    """The shell command that unpacks ``archive`` so that its content lands in ``target``.

    A zip whose members all start with ``target.name/`` unpacks into ``target.parent``; else into ``target``.
    """
    name = archive.name.lower()
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if not m.startswith(_SKIP_DIRS)]
        except (OSError, zipfile.BadZipFile):
            members = []
        nested = bool(members) and all(m.startswith(f"{target.name}/") for m in members)
        return f"unzip -q '{archive}' -d '{target.parent if nested else target}'"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2")):
        return f"mkdir -p '{target}' && tar -xf '{archive}' -C '{target}'"
    return f"unpack '{archive}' into '{target}'"


def archive_hint(base: Path) -> str:
    """'; found archives ... : unpack them first (...)' or ''."""
    found = archives(base)
    if not found:
        return ""
    listed = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"; found archive(s) {listed}: unpack them first, e.g. {unpack_command(found[0], found[0].parent)}"


def malformed(path: Path, lineno: int, problem: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {problem}")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; ``utf-8-sig`` drops a BOM left by Windows editors."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.strip()


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of the non-blank CSV rows; a broken quote raises ValueError naming the line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exn:
                raise malformed(path, reader.line_num, f"unreadable CSV ({exn})") from None
            if any(cell.strip() for cell in row):
                yield reader.line_num, [cell.strip() for cell in row]


def parse_int(text: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise malformed(path, lineno, f"{what} must be an integer, got {text!r}") from None


def au_column(header: str) -> int | None:
    """The AU number a column header names ("1", "AU1", "AU 01"), or None for any other column."""
    match = _AU_COLUMN.match(header.strip())
    return int(match.group(1)) if match else None


def restrict_aus(aus: Iterable[int], dataset: str) -> list[int]:
    """The AUs of ``dataset``'s labelled subset (facs.DATASET_AUS), sorted and unique."""
    subset = DATASET_AUS[dataset]
    return sorted({au for au in aus if au in subset})


# ---------------------------------------------------------------- splits


def check_split(split: str, dataset: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {SPLITS}, got {split!r}")


def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _subject_of(item: str | dict) -> str:
    if isinstance(item, str):
        return item
    subject = item.get("labels", item).get("subject")
    if not subject:
        raise ValueError(f"record {item.get('key')!r} has no subject; subject_split needs subject ids")
    return subject


def subject_split(records_or_subjects: Iterable[str | dict], test_fraction: float, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """Deterministic subject-exclusive split: (train subjects, test subjects), each sorted.

    The unique subjects are ranked by ``sha256(f"{seed}:{subject}")`` and the first ``round(test_fraction * n)``
    (at least one, and never all, when 0 < test_fraction and n >= 2) form the test set. The result depends only on the
    set of subjects and the seed, never on their order, so train and test conversions agree.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    subjects = sorted({_subject_of(x) for x in records_or_subjects})
    n_test = round(test_fraction * len(subjects))
    if test_fraction > 0 and len(subjects) >= 2:
        n_test = min(max(n_test, 1), len(subjects) - 1)
    ranked = sorted(subjects, key=lambda s: _rank(seed, s))
    return sorted(ranked[n_test:]), sorted(ranked[:n_test])


def image_in_test(name: str, test_fraction: float, seed: int = 0) -> bool:
    """Per-image split for still-image datasets without an official split: sha256(f"{seed}:{name}") < fraction."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    return int(_rank(seed, name)[:15], 16) / 16**15 < test_fraction


def in_split(split: str, is_test: bool) -> bool:
    return split == "all" or (split == "test") == is_test


def parse_subject_list(test_subjects: str | Iterable[str]) -> set[str]:
    """``test_subjects`` as a set: a file with one id per line, a comma-separated string, or an iterable of ids."""
    if isinstance(test_subjects, str):
        path = Path(test_subjects).expanduser()
        if path.is_file():
            return {text for _, text in text_lines(path) if not text.startswith("#")}
        return {s.strip() for s in test_subjects.split(",") if s.strip()}
    return {str(s) for s in test_subjects}


def test_subject_set(dataset: str, subjects: Iterable[str], test_fraction: float, seed: int,
                     test_subjects: str | Iterable[str] | None) -> set[str]:
    """The test subjects: the given list (checked against the dataset's subjects) or :func:`subject_split`'s."""
    subjects = set(subjects)
    if test_subjects is None:
        return set(subject_split(subjects, test_fraction, seed)[1])
    chosen = parse_subject_list(test_subjects)
    unknown = sorted(chosen - subjects)
    if unknown:
        raise ValueError(f"{dataset}: test subject(s) {unknown} are not in the dataset; "
                         f"its subjects: {sorted(subjects)}")
    return chosen


def require_test_part(dataset: str, split: str, test_fraction: float, test_subjects: object = None) -> None:
    if split == "test" and test_fraction == 0 and not test_subjects:
        raise ValueError(f"{dataset}: split 'test' is empty with test_fraction=0; pass --test-fraction (e.g. 0.1)")


# ---------------------------------------------------------------- records


class ConversionError(ValueError):
    """A conversion that would write nothing, or skip more of its rows than allowed: no complete manifest."""


class Skips:
    """Counts the rows a source does not turn into records, logs the first few, and judges the conversion.

    ``add`` counts *bad data* (a missing or unreadable image, a duplicate, a frame absent from some label files):
    these count against ``max_skipped``. ``drop`` counts rows a documented label rule excludes (a BP4D AU coded 9,
    an AffectNet code 8-10, an EmotioNet row with every AU unknown): logged and summarised, never an error by
    themselves. With ``max_skipped`` set (conversions do), :meth:`finish` raises :class:`ConversionError` when no
    record was kept, or when bad rows exceed that fraction of all rows, naming the first few.
    """

    def __init__(self, dataset: str, max_skipped: float | None = None) -> None:
        self.dataset, self.counts, self.dropped = dataset, Counter(), Counter()
        self.max_skipped = max_skipped
        self.examples: list[str] = []  # the first EXAMPLES bad rows, "detail (reason)"
        self.errors: Counter = Counter()  # rows a conversion refuses, counted by a check instead (see ``fail``)
        self.error_examples: list[str] = []  # the first EXAMPLES of them, each a full error message
        # a parallel conversion's: add/drop/finish are queued there and replayed in record order (see Deferral)
        self.deferral: Deferral | None = _DEFERRAL.get()
        watching = _WATCHERS.get()
        if watching is not None:
            watching.append(self)

    def fail(self, reason: str, message: str) -> None:
        """Count a row a conversion would stop at (an unknown AU, ...): how ``make_shards --check`` reads on."""
        self.errors[reason] += 1
        if len(self.error_examples) < EXAMPLES:
            self.error_examples.append(message)

    def add(self, reason: str, detail: str) -> None:
        if self.deferral is not None:
            self.deferral.queue(self, "add", reason, detail)
            return
        self.counts[reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{detail} ({reason})")
        if self.counts[reason] <= _WARN_FIRST:
            log.warning("%s: skipping %s (%s)", self.dataset, detail, reason)

    def drop(self, reason: str, detail: str) -> None:
        if self.deferral is not None:
            self.deferral.queue(self, "drop", reason, detail)
            return
        self.dropped[reason] += 1
        if self.dropped[reason] <= _WARN_FIRST:
            log.info("%s: leaving out %s (%s)", self.dataset, detail, reason)

    def summary(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.counts.items())]
        parts += [f"{n} {reason} (by rule)" for reason, n in sorted(self.dropped.items())]
        return ", ".join(parts) or "nothing skipped"

    def report(self, kept: int) -> None:
        if self.counts or self.dropped:
            log.warning("%s: %d record(s) kept, %d skipped, %d left out by rule: %s", self.dataset, kept,
                        self.counts.total(), self.dropped.total(), self.summary())
        else:
            log.info("%s: %d record(s) kept", self.dataset, kept)

    def finish(self, kept: int) -> None:
        """Log the summary; in a conversion (``max_skipped`` set) raise when nothing or too much survived."""
        if self.deferral is not None:
            self.deferral.queue(self, "finish", kept)
            return
        self.report(kept)
        if self.max_skipped is None:
            return
        bad, rows = self.counts.total(), kept + self.counts.total() + self.dropped.total()
        first = "; ".join(self.examples) or "none"
        if kept == 0:
            raise ConversionError(f"{self.dataset}: no samples to write ({rows} row(s) read: {self.summary()}); "
                                  f"first skipped rows: {first}. Check the layout against docs/datasets.md")
        if bad > self.max_skipped * rows:
            raise ConversionError(
                f"{self.dataset}: {bad} of {rows} rows skipped ({bad / rows:.1%}), more than the allowed "
                f"{self.max_skipped:.1%} ({self.summary()}); first skipped rows: {first}. Fix the layout "
                f"(docs/datasets.md) or, if your copy really lacks these files, pass --max-skipped {bad / rows:.2f}")


_WATCHERS: ContextVar[list[Skips] | None] = ContextVar("expblip_skips_watchers", default=None)


class Deferral:
    """The skips of a parallel conversion's sources, queued in record order (expblip.data.sources.parallel).

    A source streams records whose images a worker reads later (:class:`DeferredImage`), so a worker may still skip a
    row the source already yielded. Its own ``add``/``drop``/``finish`` therefore wait in ``events`` between the
    records, and the writer replays them, with the workers' skips, in the order one process counts them: the same
    counts, examples, log lines and final judgement. Once a reason's details can no longer be logged or named
    (EXAMPLES and _WARN_FIRST reached), its further skips are kept as counts only: a long run of bad rows between
    two records holds one event, not one per row.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []  # (skips, kind, *args), taken by the writer before each record
        self._queued: Counter = Counter()  # (id(skips), kind, reason) and (id(skips), "examples") ever queued

    def queue(self, skips: Skips, kind: str, *args: object) -> None:
        if kind == "finish":
            self.events.append((skips, kind, *args))
            return
        reason, ident = args[0], id(skips)
        self._queued[ident, kind, reason] += 1
        self._queued[ident, "examples"] += kind == "add"
        named = self._queued[ident, kind, reason] <= _WARN_FIRST or (
            kind == "add" and self._queued[ident, "examples"] <= EXAMPLES)
        if named:
            self.events.append((skips, kind, *args))
        elif self.events and self.events[-1][:2] == (skips, "counts"):
            self.events[-1][2][kind, reason] += 1
        else:
            self.events.append((skips, "counts", Counter({(kind, reason): 1})))

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events

    @staticmethod
    def replay(event: tuple, failed: int = 0) -> None:
        """Apply one queued event; ``failed``: the records of its skips' source that a worker skipped after all (a
        finish counts them out of ``kept``)."""
        skips, kind, *args = event
        deferral, skips.deferral = skips.deferral, None
        try:
            if kind == "counts":
                for (which, reason), n in args[0].items():
                    (skips.counts if which == "add" else skips.dropped)[reason] += n
            elif kind == "finish":
                skips.finish(args[0] - failed)
            else:
                getattr(skips, kind)(*args)
        finally:
            skips.deferral = deferral


_DEFERRAL: ContextVar[Deferral | None] = ContextVar("expblip_skips_deferral", default=None)


@contextmanager
def deferred_skips() -> Iterator[Deferral]:
    """Every :class:`Skips` made while the block runs queues its counting in the yielded :class:`Deferral`, and the
    table source hands its images to the workers as :class:`DeferredImage` (a parallel conversion)."""
    deferral = Deferral()
    token = _DEFERRAL.set(deferral)
    try:
        yield deferral
    finally:
        _DEFERRAL.reset(token)


@dataclass
class DeferredImage:
    """An image a parallel conversion's worker reads and checks instead of the source, which streams only labels and
    the image's reference: ``read(skips)`` returns the image, or None after counting why with ``skips.add`` (in the
    worker a recorder, replayed here into ``skips`` in record order)."""

    read: Callable[[Any], Any]  # picklable: a module-level function, or a functools.partial of one
    skips: Skips  # the source's; stays in this process


@contextmanager
def watch_skips() -> Iterator[list[Skips]]:
    """Collect every :class:`Skips` made while the block runs (sources make theirs inside), so that a check can read
    their counts part-way through a source (``make_shards --check``)."""
    found: list[Skips] = []
    token = _WATCHERS.set(found)
    try:
        yield found
    finally:
        _WATCHERS.reset(token)


def image_bytes(path: Path, skips: Skips) -> bytes | None:
    """The file's own encoded bytes (read now, for this record only); None (skipped, counted) if unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        skips.add("missing image", str(path))
        return None
    if not data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        skips.add("not a PNG/JPEG file", str(path))
        return None
    return data


def record_key(dataset: str, *parts: str | int) -> str:
    """A stable key ``dataset-part-part`` with anything but letters, digits, ``_`` and ``-`` replaced by ``_``."""
    return "-".join([dataset, *(_KEY_UNSAFE.sub("_", str(p)).strip("_") or "_" for p in parts)])


def make_record(key: str, image: bytes, labels: dict, caption: CaptionConfig) -> dict:
    return {"key": key, "image": image, "labels": labels, "captions": captions_for(labels, caption)}


def still_image_records(dataset: str, entries: Iterable[Entry], caption: CaptionConfig,
                        skips: Skips | None = None) -> Iterator[dict]:
    """Records from (key, image path, labels) entries: images read lazily, duplicates and bad images counted.

    ``skips`` may be shared with the ``entries`` generator, so rows it drops appear in the same summary.
    """
    skips, seen, kept = skips or Skips(dataset), set(), 0
    for key, path, labels in entries:
        if key in seen:
            skips.add("duplicate entry", key)
            continue
        seen.add(key)
        data = image_bytes(path, skips)
        if data is None:
            continue
        kept += 1
        yield make_record(key, data, labels, caption)
    skips.finish(kept)


def still_labels(dataset: str, aus: list[int] | None = None, emotions: list[str] | None = None, **extra) -> dict:
    """The labels dict of a still image (no subject, no frame)."""
    return {"aus": aus, "emotions": emotions, "dataset": dataset, "subject": None, "frame": None, **extra}
