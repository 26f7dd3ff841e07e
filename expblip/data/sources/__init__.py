"""Record sources: one converter per public dataset, plus the synthetic-face world.

Every source is a function returning an iterator of records
`{"key", "image", "labels": {"aus", "emotions", "dataset", "subject"}, "captions"}` (see expblip.data.shards).
"""

from __future__ import annotations

from collections.abc import Iterator

from expblip.data.captions import CaptionConfig
from expblip.data.synthetic import synthetic_records


def synthetic(samples: int, seed: int = 0, split: str = "train", image_size: int = 64,
              caption: CaptionConfig | None = None, **_: object) -> Iterator[dict]:
    """The embedded default data (expblip.data.synthetic)."""
    return synthetic_records(samples, seed=seed, image_size=image_size, caption=caption, split=split)


SOURCES = {"synthetic": synthetic}


def records(source: str, **options) -> Iterator[dict]:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[source](**options)
