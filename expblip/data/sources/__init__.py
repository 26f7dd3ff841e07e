"""Record sources: one converter per public dataset, plus the synthetic-face world.

Every source is a function returning an iterator of records (see expblip.data.shards)::

    {"key": str, "image": bytes (the file's own PNG/JPEG bytes) | PIL.Image (synthetic),
     "labels": {"aus": sorted list[int] | None, "emotions": list[str] | None, "dataset": str,
                "subject": str | None, "frame": int | None, ...dataset extras},
     "captions": captions_for(labels, caption)}

Real datasets take ``root``, ``split`` ("train" | "test" | "all"), ``caption``, ``subsample`` (video datasets) and
``max_skipped`` (set by conversions: fail when nothing, or too much, is skipped), plus ``test_fraction`` /
``split_seed`` / ``test_subjects`` where the dataset has no official split, and ``fold`` / ``folds`` /
``frame_base`` for the video datasets (expblip.data.sources.folds, _video). Layouts (each variant with the public
reader it comes from), label formats and split rules: docs/datasets.md and each module's docstring. ``table`` reads
your own label table (CSV, TSV, XLSX, JSONL, parquet; expblip.data.sources.table). A whole conversion (options,
metadata, the failure rule) is expblip.data.sources.convert; a dry run of one is expblip.data.sources.check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from expblip.data.captions import CaptionConfig
from expblip.data.sources import (
    affectnet,
    bp4d,
    disfa,
    emotionet,
    faceme,
    facetools,
    gft,
    hf,
    llava,
    raf_au,
    rafdb,
    table,
)
from expblip.data.sources._common import image_in_test, subject_split
from expblip.data.sources._video import subsample_mask
from expblip.data.synthetic import synthetic_records

__all__ = ["SOURCES", "CAPTION_STYLES", "records", "default_caption_style", "subject_split", "image_in_test",
           "subsample_mask"]


def synthetic(samples: int, seed: int = 0, split: str = "train", image_size: int = 64,
              caption: CaptionConfig | None = None, **_: object) -> Iterator[dict]:
    """The embedded default data (expblip.data.synthetic)."""
    return synthetic_records(samples, seed=seed, image_size=image_size, caption=caption, split=split)


SOURCES: dict[str, Callable[..., Iterator[dict]]] = {
    "synthetic": synthetic,
    "bp4d": bp4d.records,
    "disfa": disfa.records,
    "gft": gft.records,
    "raf_au": raf_au.records,
    "emotionet": emotionet.records,
    "affectnet": affectnet.records,
    "rafdb": rafdb.records,  # the basic part (7 classes)
    "rafdb_compound": rafdb.compound_records,
    "faceme": faceme.records,
    "table": table.records,  # your own faces: a label table (docs/datasets.md, "Your own table")
    "openface": facetools.openface_records,  # a video's OpenFace 2.0 CSV: pseudo-labels (docs/datasets.md)
    "pyfeat": facetools.pyfeat_records,  # a video's py-feat CSV: pseudo-labels
    "llava": llava.records,  # LLaVA / ShareGPT instruction JSON: task-prompt records (prompt + answer)
    "hf": hf.records,  # a Hugging Face datasets folder (save_to_disk, imagefolder, parquet), read as a table
}

# The caption style a source's own labels support: AU datasets describe AUs, emotion datasets emotions.
CAPTION_STYLES: dict[str, str] = {
    "synthetic": "au", "bp4d": "au", "disfa": "au", "gft": "au", "raf_au": "au", "emotionet": "au",
    "affectnet": "emotion", "rafdb": "emotion", "rafdb_compound": "emotion", "faceme": "emotion",
    "table": "concat",  # a row's AU sentence, emotion sentence, or both: whichever its labels carry
    "openface": "au", "pyfeat": "concat",  # py-feat with --emotions labels emotions too
    "llava": "concat", "hf": "concat",  # llava: the answers are the captions (no caption is made)
}


def _check(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")


def default_caption_style(source: str) -> str:
    """"au" for AU datasets, "emotion" for emotion datasets (captions of the other kind come from the other model)."""
    _check(source)
    return CAPTION_STYLES[source]


def records(source: str, **options) -> Iterator[dict]:
    _check(source)
    return SOURCES[source](**options)
