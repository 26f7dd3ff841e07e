"""Caption synthesis from labels: the paper's rule and LLM AU sentences, emotion sentences, and their fusion.

A record's labels are ``{"aus": list[int] | None, "emotions": list[str] | None}``; ``None`` means
the dataset does not label that aspect at all, an empty list means it was labelled and absent.
That difference matters: an AU dataset frame with no active AU gets the fixed no-AU caption,
an emotion-only image gets no AU caption (its AU caption comes later, from AU-BLIP).

``CaptionConfig`` picks the synthesis: ``style`` says which aspects a caption covers, ``au_source`` whether the AU
sentence is the rule caption, the LLM's one-shot caption or both (two captions per image), and ``fusion`` how the
"concat" style joins AU and emotion sentences (Cat-BLIP's concatenation or the paper's LLM fusion).
Without an LLM, ``captions_for(labels, cfg)`` is all a converter needs. With one, use

    stats = CaptionStats()
    write_shards(captions_for_records(records, cfg, stats=stats), out)
    print(stats.summary())

A failed LLM call (after the client's retries) never turns into a template caption: the sample keeps its other
captions and lists the failure in ``labels["caption_errors"]``, or is skipped (and counted) if none are left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from expblip.data.facs import AUS, third_person, validate_aus
from expblip.data.llm import LLMClient, LLMConfig, LLMError, llm_au_caption, llm_fuse

log = logging.getLogger(__name__)

# Verbatim from the paper (EXPBLIP.md, "Captions"): the caption for a face labelled with no AU.
NO_AU_CAPTION = (
    "The eyes may be open and looking straight ahead, with the mouth closed or slightly open in a relaxed "
    "position. The forehead may be relatively smooth with minimal wrinkles or creases. The eyebrows may be in "
    "a natural position, not raised or furrowed."
)

# A bare "The face shows neutral." reads badly; a lone neutral label gets this sentence instead.
NEUTRAL_CAPTION = "The face shows a neutral expression."


def join_list(items: Sequence[str]) -> str:
    """English list: "a", "a and b", "a, b and c" (no Oxford comma, as in the paper's example)."""
    if not items:
        raise ValueError("join_list() needs at least one item")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def au_caption(aus: Iterable[int]) -> str | None:
    """The paper's rule caption: "It is a people who raises cheek and pulls lip corner." (None if no AU)."""
    numbers = validate_aus(aus)
    if not numbers:
        return None
    phrases = [third_person(AUS[au].verb) for au in numbers]
    return f"It is a people who {join_list(phrases)}."


def emotion_caption(emotions: Iterable[str]) -> str | None:
    """The paper's emotion caption: "The face shows happiness and surprise." (None if no emotion)."""
    names = list(dict.fromkeys(e.strip() for e in emotions if e.strip()))  # de-duplicate, keep order
    if not names:
        return None
    if names == ["neutral"]:
        return NEUTRAL_CAPTION
    return f"The face shows {join_list(names)}."


def concat_fusion(au_cap: str | None, emo_cap: str | None) -> str:
    """Cat-BLIP fusion: the AU sentence then the emotion sentence, joined by a space."""
    parts = [c.strip() for c in (au_cap, emo_cap) if c and c.strip()]
    if not parts:
        raise ValueError("concat_fusion() needs at least one of au_cap / emo_cap")
    return " ".join(parts)


@dataclass
class CaptionConfig:
    """How a record's labels become training captions."""

    style: Literal["au", "emotion", "concat"] = "au"  # au: AU-BLIP, emotion: Emot-BLIP, concat: both aspects, fused
    no_au_caption: bool = True  # AUs labelled but none active -> the paper's fixed no-AU caption
    au_source: Literal["rule", "llm", "both"] = "rule"  # AU sentence: rule caption, LLM one-shot caption, or both
    fusion: Literal["concat", "llm"] = "concat"  # style concat: join the sentences (Cat-BLIP) or fuse by LLM (paper)
    llm: LLMConfig | None = None  # the LLM endpoint; required when au_source or fusion uses it

    def __post_init__(self) -> None:
        if self.style not in ("au", "emotion", "concat"):
            raise ValueError(f"CaptionConfig.style must be 'au', 'emotion' or 'concat', got {self.style!r}")
        if self.au_source not in ("rule", "llm", "both"):
            raise ValueError(f"CaptionConfig.au_source must be 'rule', 'llm' or 'both', got {self.au_source!r}")
        if self.fusion not in ("concat", "llm"):
            raise ValueError(f"CaptionConfig.fusion must be 'concat' or 'llm', got {self.fusion!r}")
        if self.needs_llm:
            if self.llm is None:
                raise ValueError(
                    f"caption style={self.style!r} with au_source={self.au_source!r}, "
                    f"fusion={self.fusion!r} calls an LLM: set caption.llm.url and caption.llm.model"
                )
            self.llm.check_endpoint("caption.llm")

    @property
    def needs_llm(self) -> bool:
        """True when some caption of this style comes from the LLM."""
        llm_au = self.style in ("au", "concat") and self.au_source != "rule"
        return llm_au or (self.style == "concat" and self.fusion == "llm")


@dataclass
class CaptionStats:
    """Counts of one captioning pass, for the caller to report."""

    ok: int = 0  # samples captioned with no LLM failure
    failed: int = 0  # samples with at least one LLM call that failed after retries (yielded partial or skipped)
    skipped: int = 0  # failed samples left with no caption at all, hence not yielded
    empty: int = 0  # samples whose labels say nothing in this style (yielded with no caption, as captions_for does)
    cached: int = 0  # LLM replies served from the on-disk cache
    requests: int = 0  # HTTP requests sent to the LLM (retries included)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT failures, "key: message"

    MAX_ERRORS_KEPT = 20

    def summary(self) -> str:
        return (
            f"captions: {self.ok} ok, {self.failed} failed ({self.skipped} skipped), {self.empty} without "
            f"labels for this style; LLM: {self.cached} cached replies, {self.requests} requests"
        )


@dataclass
class Captioned:
    """One record's captions, the source of each, and the LLM failures met on the way."""

    captions: list[str]
    sources: list[str]  # parallel to captions: rule | llm | no_au | emotion | concat:SRC | llm_fusion:SRC
    errors: list[str]


def _llm_au_part(aus: list[int], client: LLMClient | None, errors: list[str]) -> list[tuple[str, str]]:
    if client is None:
        raise ValueError("this CaptionConfig asks for LLM captions: pass an LLMClient (or use captions_for_records)")
    try:
        return [("llm", llm_au_caption(client, aus))]
    except LLMError as exn:
        errors.append(f"llm_au: {exn}")
        return []


def _au_sentences(
    aus: list[int] | None, cfg: CaptionConfig, client: LLMClient | None, errors: list[str]
) -> list[tuple[str, str]]:
    """(source, sentence) for each AU sentence ``cfg`` asks for; LLM failures are appended to ``errors``."""
    if aus is None:  # the dataset has no AU labels
        return []
    if not validate_aus(aus):  # labelled, none active: the paper's fixed sentence whatever the source
        return [("no_au", NO_AU_CAPTION)] if cfg.no_au_caption else []
    out = [("rule", au_caption(aus))] if cfg.au_source in ("rule", "both") else []
    if cfg.au_source in ("llm", "both"):
        out += _llm_au_part(aus, client, errors)
    return out


def _fused(
    au: tuple[str, str], emo: str, cfg: CaptionConfig, client: LLMClient | None, errors: list[str]
) -> tuple[str, str] | None:
    source, sentence = au
    if cfg.fusion == "concat":
        return f"concat:{source}", concat_fusion(sentence, emo)
    if client is None:
        raise ValueError("fusion='llm' needs an LLMClient (or use captions_for_records)")
    try:
        return f"llm_fusion:{source}", llm_fuse(client, sentence, emo)
    except LLMError as exn:
        errors.append(f"llm_fusion({source}): {exn}")
        return None


def caption_labels(labels: dict, cfg: CaptionConfig, client: LLMClient | None = None) -> Captioned:
    """The captions ``labels`` support under ``cfg``; LLM failures are collected, never replaced by a template."""
    errors: list[str] = []
    use_au, use_emo = cfg.style in ("au", "concat"), cfg.style in ("emotion", "concat")
    aus = _au_sentences(labels.get("aus"), cfg, client, errors) if use_au else []
    emotions = labels.get("emotions")
    emo = emotion_caption(emotions) if emotions and use_emo else None
    if emo is None:
        pairs = aus
    elif not aus:
        pairs = [("emotion", emo)]
    else:
        pairs = [p for p in (_fused(a, emo, cfg, client, errors) for a in aus) if p is not None]
    result = Captioned([], [], errors)
    for source, caption in pairs:
        if caption not in result.captions:  # "both" may give the same text twice
            result.captions.append(caption)
            result.sources.append(source)
    return result


def captions_for(labels: dict, cfg: CaptionConfig, client: LLMClient | None = None) -> list[str]:
    """The captions a record's labels support under ``cfg``; [] when the labels say nothing in that style.

    LLM captions need ``client``; a failed LLM call raises LLMError here (``captions_for_records`` counts instead).
    """
    result = caption_labels(labels, cfg, client)
    if result.errors:
        raise LLMError("; ".join(result.errors))
    return result.captions


def _caption_record(record: dict, cfg: CaptionConfig, client: LLMClient | None, stats: CaptionStats) -> dict | None:
    before = (client.cache_hits, client.requests) if client else (0, 0)
    result = caption_labels(record.get("labels") or {}, cfg, client)
    if client:
        stats.cached += client.cache_hits - before[0]
        stats.requests += client.requests - before[1]
    labels = dict(record.get("labels") or {}, caption_sources=result.sources)
    if result.errors:
        stats.failed += 1
        labels["caption_errors"] = result.errors
        for err in result.errors[: max(0, stats.MAX_ERRORS_KEPT - len(stats.errors))]:
            stats.errors.append(f"{record.get('key')}: {err}")
        if stats.failed == 1:
            log.warning(
                "LLM caption failed for %s: %s; further failures are counted", record.get("key"), result.errors[0]
            )
        if not result.captions:
            stats.skipped += 1
            return None
    elif result.captions:
        stats.ok += 1
    else:
        stats.empty += 1
    return {**record, "labels": labels, "captions": result.captions}


def captions_for_records(
    records: Iterable[dict], cfg: CaptionConfig, client: LLMClient | None = None, stats: CaptionStats | None = None
) -> Iterator[dict]:
    """``records`` with "captions" filled from their labels under ``cfg``; counts go into ``stats``.

    The client defaults to one built from ``cfg.llm`` when the config calls an LLM. A sample whose LLM call failed
    is yielded without that caption and with ``labels["caption_errors"]``, or skipped if it has no caption left.
    Each yielded record's ``labels["caption_sources"]`` says where each caption came from.
    """
    stats = stats if stats is not None else CaptionStats()
    if client is None and cfg.needs_llm:
        assert cfg.llm is not None  # checked by CaptionConfig
        client = LLMClient(cfg.llm)
    for record in records:
        out = _caption_record(record, cfg, client, stats)
        if out is not None:
            yield out
