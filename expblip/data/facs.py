"""The facial-expression vocabulary as data: Action Units, emotions, and what each dataset labels.

Everything else (captions, converters, parsers, probes) reads names from here, so one table
decides how an AU is spelled in a caption and which class an integer code means in a dataset.
Labels are stored as *names* (AU numbers, emotion words), never as dataset-specific indices:
every dataset orders its classes differently (see ``DATASET_EMOTIONS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ActionUnit:
    """One FACS Action Unit."""

    number: int  # FACS number, e.g. 12
    name: str  # FACS name, e.g. "lip corner puller"
    verb: str  # the paper's verb phrase in base form, e.g. "pull lip corner"


def _au_table(rows: Iterable[tuple[int, str, str]]) -> dict[int, ActionUnit]:
    return {number: ActionUnit(number, name, verb) for number, name, verb in rows}


# The paper's table (EXPBLIP.md, "Action Units"); verb forms are the paper's, in base form.
AUS: dict[int, ActionUnit] = _au_table(
    [
        (1, "inner brow raiser", "raise inner eyebrow"),
        (2, "outer brow raiser", "raise outer eyebrow"),
        (4, "brow lowerer", "lower brow"),
        (5, "upper lid raiser", "raise upper lid"),
        (6, "cheek raiser", "raise cheek"),
        (7, "lid tightener", "tighten lids"),
        (8, "lips toward each other", "pull lips toward each other"),
        (9, "nose wrinkler", "wrinkle nose"),
        (10, "upper lip raiser", "raise upper lip"),
        (11, "nasolabial deepener", "deepen nasolabial"),
        (12, "lip corner puller", "pull lip corner"),
        (14, "dimpler", "tighten lip corner"),
        (15, "lip corner depressor", "depress lip corner"),
        (16, "lower lip depressor", "depress lower lip"),
        (17, "chin raiser", "raise chin"),
        (18, "lip pucker", "pucker lips"),
        (19, "tongue show", "stick tongue out"),
        (20, "lip stretcher", "stretch lips"),
        (21, "neck tightener", "tighten neck"),
        (22, "lip funneler", "show lip funneler"),
        (23, "lip tightener", "tighten lips"),
        (24, "lip pressor", "press lips"),
        (25, "lips part", "separate lips"),
        (26, "jaw drop", "drop jaw"),
        (27, "mouth stretch", "stretch mouth"),
        (28, "lip suck", "suck lips"),
        (43, "eyes closed", "close eyes"),
    ]
)

# Verbs ending in a sibilant take "-es" in the third person ("press" -> "presses").
_ES_ENDINGS = ("s", "sh", "ch", "x", "z")


def third_person(verb_phrase: str) -> str:
    """Conjugate the first word of a base-form verb phrase: "raise upper lip" -> "raises upper lip"."""
    verb, _, rest = verb_phrase.strip().partition(" ")
    if not verb:
        raise ValueError("third_person() needs a non-empty verb phrase")
    if verb.endswith(_ES_ENDINGS) or verb.endswith("o"):
        verb += "es"
    elif verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        verb = verb[:-1] + "ies"
    else:
        verb += "s"
    return f"{verb} {rest}" if rest else verb


def validate_aus(aus: Iterable[int]) -> list[int]:
    """Return the AUs sorted and de-duplicated; raise ValueError naming any AU not in ``AUS``."""
    out = sorted({int(au) for au in aus})
    unknown = [au for au in out if au not in AUS]
    if unknown:
        raise ValueError(f"unknown AU(s) {unknown}; known AUs are {sorted(AUS)}")
    return out


# Canonical emotion names, in AffectNet's code order (the largest emotion set we use).
EMOTIONS: tuple[str, ...] = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")

# FACS/EMFACS prototypes (EXPBLIP.md). Neutral is the empty prototype, so "no AU" can be matched
# like any other emotion. Contempt is 12+14 on one side; the sidedness is not representable here.
EMOTION_PROTOTYPES: dict[str, tuple[int, ...]] = {
    "neutral": (),
    "happiness": (6, 12),
    "sadness": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 20, 26),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "contempt": (12, 14),
}

# The AUs each dataset labels (or, where noted, the subset conventionally evaluated).
DATASET_AUS: dict[str, tuple[int, ...]] = {
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "disfa": (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26),  # present when intensity >= 2
    "disfa8": (1, 2, 4, 6, 9, 12, 25, 26),  # the 8 usually evaluated
    "gft": (1, 2, 4, 6, 10, 12, 14, 15, 23, 24),
    "raf_au": (1, 2, 4, 5, 6, 9, 10, 12, 16, 17, 25, 26, 27),  # the 13 evaluated; L/R/T/B prefixes dropped
    "emotionet": (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26),  # manual labels only
    "synthetic": (1, 2, 4, 5, 6, 9, 12, 15, 20, 25, 26, 43),  # what expblip.data.synthetic draws
    # The face tools' pseudo-labels (expblip.data.sources.facetools): OpenFace 2.0's AU occurrence (_c) columns less
    # AU45 (blink, not in AUS), and py-feat's 20 AU probability columns.
    "openface": (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 28),
    "pyfeat": (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 17, 20, 23, 24, 25, 26, 28, 43),
}

# Each dataset's class names in its official code order; the code of a name is its index plus
# DATASET_CODE_BASE[dataset]. Synthetic reuses AffectNet's order (codes 0-7) so one 8-way probe
# head fits both; its contempt is the bare AU12 subset of 12+14 (see synthetic.py).
DATASET_EMOTIONS: dict[str, tuple[str, ...]] = {
    "affectnet": EMOTIONS,  # codes 0-7; codes 8-10 (none, uncertain, non-face) are dropped
    "rafdb_basic": ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),  # codes 1-7
    "synthetic": EMOTIONS,
}

# RAF-DB numbers its classes from 1 (its label files say "image.jpg 4" for happiness).
DATASET_CODE_BASE: dict[str, int] = {"affectnet": 0, "rafdb_basic": 1, "synthetic": 0}


def emotion_from_code(dataset: str, code: int) -> str:
    """Map a dataset's integer emotion code to the canonical emotion name."""
    if dataset not in DATASET_EMOTIONS:
        raise ValueError(f"no emotion codes for dataset {dataset!r}; known: {sorted(DATASET_EMOTIONS)}")
    names, base = DATASET_EMOTIONS[dataset], DATASET_CODE_BASE[dataset]
    index = int(code) - base
    if not 0 <= index < len(names):
        raise ValueError(
            f"unknown emotion code {code!r} for dataset {dataset!r}: valid codes are {base}..{base + len(names) - 1}"
        )
    return names[index]


def code_from_emotion(dataset: str, emotion: str) -> int:
    """Inverse of ``emotion_from_code``: the dataset's code for a canonical emotion name."""
    if dataset not in DATASET_EMOTIONS:
        raise ValueError(f"no emotion codes for dataset {dataset!r}; known: {sorted(DATASET_EMOTIONS)}")
    names = DATASET_EMOTIONS[dataset]
    if emotion not in names:
        raise ValueError(f"emotion {emotion!r} is not a class of dataset {dataset!r}; classes: {names}")
    return names.index(emotion) + DATASET_CODE_BASE[dataset]
