"""A Hugging Face ``datasets`` dataset → records (``make_shards hf --dataset PATH``), through the table source.

Three local layouts, read with the ``datasets`` library and never from the hub (HF_DATASETS_OFFLINE=1):

    a save_to_disk folder      state.json + dataset_info.json + data-*.arrow (a Dataset), or dataset_dict.json and
                               one such folder per split (a DatasetDict): memory-mapped by load_from_disk
    an imagefolder             images with a metadata.jsonl / metadata.csv naming them in "file_name", or class
                               folders (train/happy/x.jpg: the class becomes the "label" column); streamed
    parquet                    a .parquet file or a folder of them (train-*.parquet, test-*.parquet), with an
                               Image column or a column of image paths; streamed

Rows are read in Arrow batches, the images undecoded (an Image column's {"bytes", "path"}): bytes stored in the
dataset are written as they are, paths are read from --root (default: the dataset's folder). Each row then goes
through the table source (expblip.data.sources.table): the same column names and options (--aus-column,
--emotion-column, --au-threshold, --emotion-map, ...), the same label parsing, skip counts and refusals. Two
additions: the image column is the dataset's first Image column unless --image-column names one, and a ClassLabel
column is read as its class names (a ClassLabel ``label`` column is the emotion when no emotion column is found).

Split: a dataset with several splits (a DatasetDict, imagefolder's train/ and test/ folders, train-/test- parquet
files) gives --split its own part (test also matches validation); a dataset of one split is split as a table is
(a split column, or --test-fraction).
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

from PIL import Image

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import ConversionError, Skips, check_split
from expblip.data.sources._rows import Row, Table
from expblip.data.sources.table import (
    AUTO,
    TableOptions,
    TableReader,
    _norm,
    decode_image,
    load_emotion_map,
    resolve_columns,
)

DATASET = "hf"
BATCH_ROWS = 256  # rows decoded from Arrow at a time
IMAGE_BYTES = "\0image_bytes"  # where a row keeps the image bytes stored in the dataset (no column has this name)
SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "valid", "val")}
LABEL_COLUMNS = ("label", "labels")  # a ClassLabel column taken as the emotion when none is named
EXPECTED = ("a datasets save_to_disk folder, an imagefolder (images + metadata.jsonl), or parquet files with an "
            "image column (docs/datasets.md, 'A Hugging Face dataset')")


class HFError(ConversionError):
    """A dataset folder that ``datasets`` cannot read, or a split it does not have."""


@dataclass
class HFData:
    """An opened dataset: its rows (the image column's bytes set aside) and what the table reader needs."""

    path: str  # as given
    base: str  # the folder relative image paths start from
    columns: list[str]
    rows: Iterator[Row]
    image_column: str | None  # the first Image column
    class_columns: list[str]  # ClassLabel columns (read as class names)
    has_splits: bool  # the dataset holds several splits: --split chose one (or all)


def check_request(source: str, dataset: str) -> None:
    """A conversion's --dataset: the hf source needs one; the others take none."""
    if source == "hf" and not dataset:
        raise ValueError(f"the hf source needs --dataset PATH: {EXPECTED}")
    if source != "hf" and dataset:
        raise ValueError(f"--dataset applies only to the hf source, not {source!r}")


# ---------------------------------------------------------------- opening


def _offline() -> None:
    """No hub access, set before ``datasets`` is imported (it reads these once)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load(path: Path) -> Any:
    """The dataset at ``path``: Dataset / DatasetDict (save_to_disk) or their streaming kinds (imagefolder, parquet)."""
    _offline()
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file() and path.suffix in (".parquet", ".pq"):
        return datasets.load_dataset("parquet", data_files=str(path), streaming=True)
    if path.is_dir() and next(path.rglob("*.parquet"), None) is not None:
        return datasets.load_dataset("parquet", data_dir=str(path), streaming=True)
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path), streaming=True)
    raise HFError(f"hf: {path} is neither a folder nor a .parquet file; expected {EXPECTED}")


def _parts(loaded: Any, split: str, path: str) -> tuple[list[tuple[str, Any]], bool]:
    """[(split name, dataset)] that --split asks for, and whether the dataset held several splits."""
    if not hasattr(loaded, "keys"):  # a Dataset: one split
        return [("train", loaded)], False
    names = list(loaded.keys())
    if len(names) == 1:
        return [(names[0], loaded[names[0]])], False
    if split == "all":
        return [(n, loaded[n]) for n in names], True
    found = [n for n in SPLIT_NAMES[split] if n in names]
    if not found:
        raise HFError(f"hf: {path} has the splits {names}, none of them {split!r} ({'/'.join(SPLIT_NAMES[split])})"
                      f"; choose --split {' or '.join(sorted({'train', 'test'} & set(names)) or ['all'])}")
    return [(found[0], loaded[found[0]])], True


def open_dataset(path: str, split: str) -> HFData:
    """``path`` opened for ``split``; FileNotFoundError / HFError naming the path and what was expected."""
    local = Path(path).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"hf: {path} does not exist; pass --dataset with {EXPECTED}")
    try:
        parts, has_splits = _parts(_load(local), split, path)
    except HFError:
        raise
    except Exception as exn:  # datasets raises its own kinds (DataFilesNotFoundError, DatasetGenerationError, ...)
        raise HFError(f"hf: {path} cannot be read by datasets ({type(exn).__name__}: {exn}); expected "
                      f"{EXPECTED}") from None
    features = parts[0][1].features or {}
    images = [c for c, f in features.items() if type(f).__name__ == "Image"]
    classes = {c: f for c, f in features.items() if type(f).__name__ == "ClassLabel"}
    base = str(local if local.is_dir() else local.parent)
    rows = chain.from_iterable(_rows(ds, f"{path} [{name}]", name, base, classes) for name, ds in parts)
    columns = list(features) or list(getattr(parts[0][1], "column_names", None) or [])
    return HFData(path, base, columns, rows, images[0] if images else None, list(classes), has_splits)


# ---------------------------------------------------------------- rows


def _rows(ds: Any, where: str, split: str, base: str, classes: dict[str, Any]) -> Iterator[Row]:
    """("PATH [split] row N", row) in Arrow batches, images undecoded, class ids as their names."""
    number = 0
    for batch in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            for column, feature in classes.items():
                value = row.get(column)
                row[column] = feature.int2str(value) if isinstance(value, int) and value >= 0 else None  # -1: none
            yield f"{where} row {number}", _images(row, base, f"{split}-{number}")


def _images(row: dict, base: str, fallback: str) -> dict:
    """Image cells ({"bytes", "path"}) → a path reference; the bytes of the row's first stored image kept aside."""
    for column, cell in list(row.items()):
        if not (isinstance(cell, dict) and set(cell) == {"bytes", "path"}):
            continue
        data, path = cell["bytes"], cell["path"]
        row[column] = _relative(path, base) if path else (fallback if data else None)
        if data:
            row.setdefault(IMAGE_BYTES, {})[column] = data
    return row


def _relative(path: str, base: str) -> str:
    """An absolute path under the dataset's folder as relative to it (stable keys on any machine)."""
    if not os.path.isabs(path):
        return path
    for folder in {os.path.abspath(base), os.path.realpath(base)}:
        if Path(path).is_relative_to(folder):
            return Path(path).relative_to(folder).as_posix()
    return path


@dataclass
class HFReader(TableReader):
    """The table reader, taking an image stored in the dataset from the row itself."""

    def image(self, where: str, row: dict, ref: str) -> bytes | Image.Image | None:
        data = (row.get(IMAGE_BYTES) or {}).get(self.columns.image)
        if not data:
            return super().image(where, row, ref)
        detail = f"{where}: {posixpath.basename(ref)}"
        if getattr(self.skips, "deferral", None) is not None:  # a parallel conversion: a worker decodes it, in order
            from expblip.data.sources._common import DeferredImage

            return DeferredImage(functools.partial(decode_image, data, detail=detail), self.skips)
        return decode_image(data, self.skips, detail)


def _with_dataset_columns(opts: TableOptions, data: HFData) -> TableOptions:
    """The dataset's Image column as the image column, a ClassLabel ``label`` as the emotion, unless named."""
    if opts.image_column is None and data.image_column is not None:
        opts = replace(opts, image_column=data.image_column)
    by_norm = {_norm(c) for c in data.columns}
    if opts.emotion_column is None and not by_norm & set(AUTO["emotion"]):
        label = next((c for c in data.class_columns if _norm(c) in LABEL_COLUMNS), None)
        opts = replace(opts, emotion_column=label) if label else opts
    return opts


def records(root: str = "", split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            dataset: str = "", test_fraction: float = 0.0, split_seed: int = 0, max_skipped: float | None = None,
            limit: int | None = None, lenient: bool = False, **options: Any) -> Iterator[dict]:
    """The rows of a ``datasets`` dataset as records (``options``: TableOptions' column fields and name)."""
    check_split(split, DATASET)
    if root and "://" not in root and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"hf: image root {root} is not a directory; pass --root with the folder the "
                                f"images' paths start from (default: the dataset's), and --dataset with {EXPECTED}")
    if not dataset:
        raise FileNotFoundError(f"hf: no dataset given (--dataset PATH) for the images under {root or '--root'}; "
                                f"expected {EXPECTED}")
    data = open_dataset(dataset, split)
    opts = _with_dataset_columns(TableOptions.from_options({"name": DATASET, **options}), data)
    columns = resolve_columns(Table(data.path, data.columns, iter(())), opts)
    if (data.has_splits or columns.split) and test_fraction:
        raise ValueError(f"hf: {dataset} has its own splits ({'splits' if data.has_splits else columns.split!r}): "
                         "drop --test-fraction")
    if split == "test" and not data.has_splits and not columns.split and not test_fraction:
        raise ValueError(f"hf: split 'test' is empty: {dataset} holds one split and no split column; pass "
                         "--test-fraction (e.g. 0.1) or convert it with --split train")
    reader = HFReader(Table(data.path, data.columns, data.rows), columns, opts, root=root or data.base,
                      caption=caption or CaptionConfig("concat"), skips=Skips(opts.name, max_skipped),
                      split="all" if data.has_splits else split, test_fraction=test_fraction,
                      split_seed=split_seed, limit=limit, lenient=lenient, codes=load_emotion_map(opts.emotion_map))
    return iter(reader)
