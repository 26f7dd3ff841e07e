"""The synthetic-face world split as the paper's data: an AU dataset, an emotion dataset and a held-out test set.

    au_records(3000)        "AU dataset": only AU labels (emotions=None), rule AU captions ("It is a people who ...")
    emotion_records(3000)   "emotion dataset": only emotion labels (aus=None), emotion captions ("The face shows
                            happiness."); faces drawn from the emotion prototypes
    test_records(300)       fully labelled held-out faces whose AU combinations never occur in either training part
    part_records("val", n)  drawn as the test faces, from validation subjects: for choices, never for reports

Subjects. Every face belongs to a subject, an identity with its own skin, hair, iris and face shape
(``expblip.data.synthetic.subject_style``; background and pose vary per face). Each part draws its faces from its
own pool (``SUBJECTS``: a few hundred training identities, validation and test identities apart from them), so the
test set measures subject-independent generalisation, and ``labels["subject"]`` is filled.

Emotion faces. An emotion face shows its synthetic prototype (``SYNTHETIC_PROTOTYPES``) and, with probability
``EXTRA_AU_P``, one extra AU that keeps the face in that emotion's *family*: not in the prototype, not exclusive
with it (12/15, 5/43), and not making the face show another emotion's whole prototype that the emotion's own does
not already contain (contempt 12 + cheek raise 6 is happiness; sadness 1+4+15 + nose wrinkle 9 shows disgust 9+15;
surprise + lip-corner pull 12 shows contempt 12). Such a face would carry two emotions' evidence under one label.
Real emotion datasets hold such faces (a happy face that also blinks); here they give the test set emotion faces
with unseen AU combinations. A neutral face stays neutral with parted lips, a dropped jaw or closed eyes
(``NEUTRAL_EXTRAS``). An emotion with too few one-extra members (fear) also counts prototype-plus-two-extras ones.

Held-out AU combinations (``is_held_out``), decided by a stable hash of the sorted AU list so that any process draws
the same split:
  * per emotion, neutral included, ``HELD_OUT_PER_EMOTION`` (3) family members: those whose combinations hash
    lowest, so emotion accuracy rests on 24 patterns, not 7;
  * among all other combinations (outside every emotion family), those whose hash is divisible by
    ``HOLD_OUT_EVERY`` (about one in four).
Prototypes themselves and the bare face are never held out. Both training generators *reject* held-out combinations
(they redraw, deterministically), so the test faces show combinations no training face shows. The test set is half
emotion faces (a held-out family member of a uniformly drawn emotion, labelled with its AUs and its emotion) and half
AU faces (a held-out combination outside the families, labelled with its AUs, ``emotions=None`` and
``no_emotion=True``: the world defines no emotion there, so a caption naming one is a false positive).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from functools import cache

from expblip.data.captions import CaptionConfig, captions_for
from expblip.data.synthetic import (
    EXCLUSIVE_PAIRS,
    SYNTHETIC_AUS,
    SYNTHETIC_PROTOTYPES,
    draw_face,
    sample_labels,
    subject_style,
)

EXTRA_AU_P = 0.5  # probability that an emotion face shows one extra (family) AU
HELD_OUT_PER_EMOTION = 3  # family members of each emotion reserved for the test (and validation) faces
NEUTRAL_EXTRAS: tuple[tuple[int, ...], ...] = ((25,), (25, 26), (43,), (25, 43))  # still a neutral face
SUBJECTS = {"au": 200, "emotion": 200, "val": 60, "test": 100}  # identities per part, each part its own pool
HOLD_OUT_EVERY = 4  # outside the emotion families, combinations whose hash % HOLD_OUT_EVERY == 0 are held out
TEST_EMOTION_FRACTION = 0.5  # share of emotion faces in the test set
MAX_DRAWS = 10_000  # rejection sampling gives up after this many draws (never reached with the defaults)
Combo = tuple[int, ...]


def combo_hash(aus: Sequence[int]) -> int:
    """A stable (process-independent) hash of an AU combination."""
    text = ",".join(str(au) for au in sorted(aus))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _exclusive(aus: set[int], au: int) -> bool:
    return any((au == a and b in aus) or (au == b and a in aus) for a, b in EXCLUSIVE_PAIRS)


@cache
def emotion_families() -> dict[Combo, str]:
    """Every emotion face's AU combination -> its emotion: prototypes and prototype + one allowed extra AU."""
    protos = {tuple(p): e for e, p in SYNTHETIC_PROTOTYPES.items()}
    families: dict[Combo, str] = dict(protos)
    for emotion, proto in SYNTHETIC_PROTOTYPES.items():
        for combo in _extras(emotion, proto, protos):
            families[combo] = emotion
    return families


def _shown_prototypes(aus: Combo, protos: dict[Combo, str]) -> set[str]:
    """The non-neutral emotions whose whole prototype the face shows."""
    return {e for p, e in protos.items() if p and set(p) <= set(aus)}


def _extras(emotion: str, proto: Combo, protos: dict[Combo, str]) -> list[Combo]:
    if emotion == "neutral":
        return list(NEUTRAL_EXTRAS)
    own = _shown_prototypes(proto, protos)  # fear's prototype already holds surprise's and anger's
    allowed = []
    for au in SYNTHETIC_AUS:
        if au in proto or _exclusive(set(proto), au):
            continue
        extra = (au, 25) if au == 26 else (au,)  # the world's rule: 26 implies 25
        if _shown_prototypes(tuple(sorted({*proto, *extra})), protos) <= own:  # contempt + 6 shows happiness
            allowed.append(extra)
    out = sorted({tuple(sorted({*proto, *extra})) for extra in allowed})
    if len(out) <= HELD_OUT_PER_EMOTION:  # too few for held-out members and training ones: pairs of extras too
        pairs = {tuple(sorted({*proto, *a, *b})) for i, a in enumerate(allowed) for b in allowed[i + 1:]
                 if not any(_exclusive({*proto, *a}, au) for au in b)}
        out += sorted(c for c in pairs - set(out) if _shown_prototypes(c, protos) <= own)
    return out


@cache
def held_out_family_members() -> dict[str, tuple[Combo, ...]]:
    """emotion -> its HELD_OUT_PER_EMOTION held-out family members (the non-prototype combinations that hash
    lowest): the emotion patterns of the test faces."""
    members: dict[str, list[Combo]] = {}
    protos = set(tuple(p) for p in SYNTHETIC_PROTOTYPES.values())
    for combo, emotion in emotion_families().items():
        if combo not in protos:
            members.setdefault(emotion, []).append(combo)
    return {e: tuple(sorted(combos, key=combo_hash)[:HELD_OUT_PER_EMOTION]) for e, combos in sorted(members.items())}


@cache
def emotion_patterns() -> dict[Combo, str]:
    """Every held-out emotion pattern (AU combination) -> its emotion."""
    return {combo: emotion for emotion, combos in held_out_family_members().items() for combo in combos}


def is_held_out(aus: Sequence[int]) -> bool:
    """True for the AU combinations reserved for the test set (see the module docstring)."""
    combo = tuple(sorted(aus))
    if combo in emotion_families():
        return combo in emotion_patterns()
    return combo_hash(combo) % HOLD_OUT_EVERY == 0


def emotion_of_face(aus: Sequence[int]) -> list[str] | None:
    """The emotion of a face in this world: its family's emotion, or None outside every family."""
    emotion = emotion_families().get(tuple(sorted(aus)))
    return [emotion] if emotion else None


# ---------------------------------------------------------------- label draws


def _draw(rng: random.Random, draw, accept) -> list[int]:
    for _ in range(MAX_DRAWS):
        aus = draw(rng)
        if accept(aus):
            return aus
    raise RuntimeError(f"no acceptable AU combination in {MAX_DRAWS} draws; check HOLD_OUT_EVERY")


def _emotion_face(rng: random.Random, emotion: str, extra_p: float = EXTRA_AU_P) -> list[int]:
    family = sorted(c for c, e in emotion_families().items() if e == emotion and c != SYNTHETIC_PROTOTYPES[emotion])
    if family and rng.random() < extra_p:
        return list(rng.choice(family))
    return list(SYNTHETIC_PROTOTYPES[emotion])


def au_dataset_labels(rng: random.Random) -> dict:
    """An AU-dataset face: the world's mixed AU draw, held-out combinations rejected; no emotion label."""
    aus = _draw(rng, lambda r: sample_labels(r, "mixed")["aus"], lambda a: not is_held_out(a))
    return {"aus": aus, "emotions": None}


def emotion_dataset_labels(rng: random.Random) -> dict:
    """An emotion-dataset face: a uniformly chosen emotion (neutral included), its prototype maybe plus one family
    AU, held-out combinations rejected; no AU label."""
    emotion = rng.choice(sorted(SYNTHETIC_PROTOTYPES))
    aus = _draw(rng, lambda r: _emotion_face(r, emotion), lambda a: not is_held_out(a))
    return {"aus": aus, "emotions": [emotion]}


def test_labels(rng: random.Random) -> dict:
    """A test (or validation) face: a held-out family member of a uniformly drawn emotion (neutral included), or a
    held-out combination outside the families; labelled with its AUs and its emotion, or ``no_emotion`` where the
    world defines none."""
    if rng.random() < TEST_EMOTION_FRACTION:
        emotion = rng.choice(sorted(held_out_family_members()))
        aus = list(rng.choice(held_out_family_members()[emotion]))
    else:
        outside = lambda a: tuple(a) not in emotion_families() and is_held_out(a)  # noqa: E731
        aus = _draw(rng, lambda r: sample_labels(r, "independent")["aus"], outside)
    emotions = emotion_of_face(aus)
    return {"aus": aus, "emotions": emotions, "no_emotion": emotions is None}


# ---------------------------------------------------------------- records


PARTS = {  # part -> (label draw, caption style, labels kept: the other aspect is None = not labelled)
    "au": (au_dataset_labels, "au", ("aus",)),
    "emotion": (emotion_dataset_labels, "emotion", ("emotions",)),
    "test": (test_labels, "concat", ("aus", "emotions", "no_emotion")),
    "val": (test_labels, "concat", ("aus", "emotions", "no_emotion")),
}


def part_records(part: str, n: int, seed: int = 0, image_size: int = 64) -> Iterator[dict]:
    """``n`` records of one part ("au", "emotion", "val" or "test"); deterministic given (part, seed, index).

    The face is drawn from the full AUs, in the style of a subject from the part's pool; the labels keep only what
    the part's dataset labels. Test captions are the concatenated AU and emotion sentences (references for caption
    metrics; the scores use the labels).
    """
    if part not in PARTS:
        raise ValueError(f"unknown world part {part!r}; choose one of {sorted(PARTS)}")
    draw, style, kept = PARTS[part]
    cfg = CaptionConfig(style=style)
    for i in range(n):
        rng = random.Random(f"expblip-world/{part}/{seed}/{i}")
        drawn = draw(rng)
        subject = f"{part}-s{rng.randrange(SUBJECTS[part]):03d}"
        labels = {"aus": None, "emotions": None, "dataset": f"synthetic-{part}", "subject": subject}
        labels.update({k: drawn[k] for k in kept})
        image = draw_face(drawn["aus"], rng, image_size, style=subject_style(subject, rng))
        yield {"key": f"{part}-{seed}-{i:07d}", "image": image, "labels": labels,
               "captions": captions_for(labels, cfg)}


def au_records(n: int, seed: int = 0) -> Iterator[dict]:
    return part_records("au", n, seed)


def emotion_records(n: int, seed: int = 0) -> Iterator[dict]:
    return part_records("emotion", n, seed)


def test_records(n: int, seed: int = 0) -> Iterator[dict]:
    return part_records("test", n, seed)


test_records.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
test_labels.__test__ = False  # type: ignore[attr-defined]
