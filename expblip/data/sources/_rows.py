"""A label table streamed row by row: CSV, TSV, XLSX, JSONL or parquet, on local disk or any fsspec URL.

    table = open_table("labels.csv")     # the header is read now: a missing or empty file fails here
    table.columns                        # ["image", "aus", "emotion"]
    for where, row in table.rows:        # ("labels.csv row 2", {"image": "a.jpg", "aus": "1,2", ...})
        ...

Nothing holds the table in memory: CSV/TSV through the ``csv`` module, JSONL line by line, XLSX through openpyxl's
read-only mode (the first sheet), parquet in record batches (``pyarrow.parquet.ParquetFile.iter_batches``). Cells
keep the type the format gives them (text for CSV/TSV, numbers and lists for the others); rows without any value
are passed over. Row numbers are the ones a user sees: the line of a CSV/TSV/JSONL file, the sheet row of an XLSX,
the 1-based data row of a parquet file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from expblip.data.sources._common import ConversionError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".xlsx": "xlsx", ".xlsm": "xlsx",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
JSONL_SCAN = 1000  # JSONL has no header: the columns are the keys of the first this many objects
BATCH_ROWS = 1024  # parquet rows decoded at a time

Row = tuple[str, dict[str, Any]]  # ("FILE row N", {column: cell})


class TableError(ConversionError):
    """A table that cannot be read: unknown format, no header, a misnamed column, a broken line (a conversion that
    meets one part-way discards its partial manifest, as for any refused conversion)."""


@dataclass
class Table:
    """An opened table: its file, its columns (header order) and its rows, read lazily."""

    path: str  # the file as given
    columns: list[str]
    rows: Iterator[Row]


def table_format(path: str) -> str:
    """csv | tsv | xlsx | jsonl | parquet, from the file name's extension."""
    name = path.lower().rstrip("/")
    for ext, kind in FORMATS.items():
        if name.endswith(ext):
            return kind
    raise TableError(f"table {path}: unknown file type; name it .csv, .tsv, .xlsx, .jsonl or .parquet")


def open_table(path: str) -> Table:
    """The table at ``path`` (local or fsspec URL) with its header read; FileNotFoundError / TableError otherwise."""
    from expblip.data.shards import url_to_fs

    kind = table_format(path)
    fs, inner = url_to_fs(path)
    if not fs.isfile(inner):
        raise FileNotFoundError(f"table {path} does not exist; pass --table with the path of your label table")
    f = fs.open(inner, "rb")
    try:
        columns, rows = _READERS[kind](f, path)
    except BaseException:
        f.close()
        raise
    if not columns:
        f.close()
        raise TableError(f"table {path} is empty: expected a header row (or, for JSONL, objects) naming the "
                         "columns, e.g. image,aus,emotion")
    return Table(path, columns, _closing(rows, f))


def _closing(rows: Iterator[Row], f: IO[bytes]) -> Iterator[Row]:
    try:
        yield from rows
    finally:
        f.close()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text_reader(f: IO[bytes], path: str, delimiter: str) -> tuple[list[str], Iterator[Row]]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    header = _next_csv(reader, path)
    while header is not None and all(_blank(c) for c in header):
        header = _next_csv(reader, path)
    columns = [c.strip() for c in header or []]
    return columns, _csv_rows(reader, path, columns)


def _next_csv(reader: Any, path: str) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exn:
        raise TableError(f"{path}:{reader.line_num}: unreadable line ({exn}); fix the quoting there") from None


def _csv_rows(reader: Any, path: str, columns: list[str]) -> Iterator[Row]:
    while (cells := _next_csv(reader, path)) is not None:
        if any(not _blank(c) for c in cells):
            yield f"{path} row {reader.line_num}", dict(zip(columns, cells, strict=False))


def _csv(f: IO[bytes], path: str) -> tuple[list[str], Iterator[Row]]:
    return _text_reader(f, path, ",")


def _tsv(f: IO[bytes], path: str) -> tuple[list[str], Iterator[Row]]:
    return _text_reader(f, path, "\t")


def _xlsx(f: IO[bytes], path: str) -> tuple[list[str], Iterator[Row]]:
    from openpyxl import load_workbook

    book = load_workbook(f, read_only=True, data_only=True)
    rows = book.worksheets[0].iter_rows(values_only=True)
    header = next(rows, None)
    columns = [str(c).strip() for c in header or () if c is not None]
    return columns, _xlsx_rows(book, rows, path, columns)


def _xlsx_rows(book: Any, rows: Iterator[tuple], path: str, columns: list[str]) -> Iterator[Row]:
    try:
        for rowno, cells in enumerate(rows, 2):
            if any(not _blank(c) for c in cells):
                yield f"{path} row {rowno}", dict(zip(columns, cells, strict=False))
    finally:
        book.close()


def _jsonl(f: IO[bytes], path: str) -> tuple[list[str], Iterator[Row]]:
    lines = _json_objects(f, path)
    first = [row for _, row in zip(range(JSONL_SCAN), lines, strict=False)]
    columns = list(dict.fromkeys(key for _, obj in first for key in obj))
    return columns, _chain(first, lines)


def _chain(first: list[Row], rest: Iterator[Row]) -> Iterator[Row]:
    yield from first
    yield from rest


def _json_objects(f: IO[bytes], path: str) -> Iterator[Row]:
    for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exn:
            raise TableError(f"{path}:{lineno}: not a JSON object ({exn}); each line holds one object") from None
        if not isinstance(obj, dict):
            raise TableError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        yield f"{path} row {lineno}", obj


def _parquet(f: IO[bytes], path: str) -> tuple[list[str], Iterator[Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exn:  # pyarrow raises ArrowInvalid for a file that is not parquet
        raise TableError(f"table {path} is not a readable parquet file ({exn})") from None
    return list(parquet.schema_arrow.names), _parquet_rows(parquet, path)


def _parquet_rows(parquet: Any, path: str) -> Iterator[Row]:
    rowno = 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            rowno += 1
            if any(not _blank(v) for v in row.values()):
                yield f"{path} row {rowno}", row


_READERS = {"csv": _csv, "tsv": _tsv, "xlsx": _xlsx, "jsonl": _jsonl, "parquet": _parquet}
