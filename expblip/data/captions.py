"""Caption synthesis from labels: the paper's rule-based AU and emotion sentences and Cat-BLIP fusion.

A record's labels are ``{"aus": list[int] | None, "emotions": list[str] | None}``; ``None`` means
the dataset does not label that aspect at all, an empty list means it was labelled and absent.
That difference matters: an AU dataset frame with no active AU gets the fixed no-AU caption,
an emotion-only image gets no AU caption (its AU caption comes later, from AU-BLIP).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from expblip.data.facs import AUS, third_person, validate_aus

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

    style: Literal["au", "emotion", "concat"] = "au"  # au: AU-BLIP, emotion: Emot-BLIP, concat: Cat-BLIP
    no_au_caption: bool = True  # AUs labelled but none active -> the paper's fixed no-AU caption

    def __post_init__(self) -> None:
        if self.style not in ("au", "emotion", "concat"):
            raise ValueError(f"CaptionConfig.style must be 'au', 'emotion' or 'concat', got {self.style!r}")


def _au_part(aus: list[int] | None, cfg: CaptionConfig) -> str | None:
    if aus is None:  # the dataset has no AU labels
        return None
    cap = au_caption(aus)
    if cap is None and cfg.no_au_caption:
        return NO_AU_CAPTION
    return cap


def captions_for(labels: dict, cfg: CaptionConfig) -> list[str]:
    """The captions a record's labels support under ``cfg``; [] when the labels say nothing in that style."""
    au_cap = _au_part(labels.get("aus"), cfg) if cfg.style in ("au", "concat") else None
    emotions = labels.get("emotions")
    emo_cap = emotion_caption(emotions) if emotions and cfg.style in ("emotion", "concat") else None
    if au_cap is None and emo_cap is None:
        return []
    return [concat_fusion(au_cap, emo_cap)]
