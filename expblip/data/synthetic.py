"""The synthetic-face world: procedurally drawn cartoon faces whose geometry follows their AU labels.

It is the embedded default data (DESIGN.md, "The synthetic-face world"): no real face dataset can be
downloaded here, yet the whole chain (shards, training, captions, probes) must be shown to learn.
A tiny ViT has to read these AUs at 64x64 px after minutes of CPU training, so every AU moves
something by several pixels or adds a high-contrast mark; nothing is subtle.

Drawn AUs (``DATASET_AUS["synthetic"]``) and what each does:
  1 inner brow ends up + central forehead lines     2 outer brow ends up + lateral forehead lines
  4 brows down and together + vertical frown lines  5 eyes opened wide (white above the iris)
  6 lower lids pushed up, cheek bulges, crow's feet 9 nose-bridge wrinkles, raised nostrils, nasolabial lines
  12 lip corners up                                 15 lip corners down
  20 mouth stretched wider, thinner lips            25 lips parted: dark gap with teeth
  26 jaw dropped: mouth tall and open, chin lower   43 eyes closed (drawn as lid lines)
Label rules: 12 and 15 exclude each other, as do 5 and 43; a dropped jaw always parts the lips
here, so 26 implies 25 in the labels (otherwise 25 would be invisible whenever 26 is present).

Nuisances: face aspect, skin tone, hair, background, position (+-3 px), scale (0.9-1.1),
rotation (+-8 degrees), Gaussian pixel noise. Faces are drawn 4x larger and LANCZOS-downsampled.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from expblip.data.captions import CaptionConfig, captions_for
from expblip.data.facs import DATASET_AUS, EMOTION_PROTOTYPES, EMOTIONS, validate_aus

SYNTHETIC_AUS: tuple[int, ...] = DATASET_AUS["synthetic"]
EXCLUSIVE_PAIRS: tuple[tuple[int, int], ...] = ((12, 15), (5, 43))
INDEPENDENT_P = 0.3  # probability of each AU in an independent sample (before exclusivity)
MIXED_WEIGHTS = {"independent": 0.5, "prototype": 0.4, "neutral": 0.1}  # "mixed" mode's draw
SUPERSAMPLE = 4  # draw at 4x, then LANCZOS down: anti-aliased strokes
NOISE_SIGMA = 3.0  # pixel noise std on the 0-255 scale
Point = tuple[float, float]
RGB = tuple[int, int, int]


# ---------------------------------------------------------------- labels


def _close_labels(aus: Iterable[int]) -> list[int]:
    """Apply the world's label rule (26 implies 25) and sort."""
    out = set(aus)
    if 26 in out:
        out.add(25)
    return sorted(out)


# Each emotion's prototype restricted to what this world draws (contempt 12+14 -> bare 12).
SYNTHETIC_PROTOTYPES: dict[str, tuple[int, ...]] = {
    emotion: tuple(_close_labels(au for au in EMOTION_PROTOTYPES[emotion] if au in SYNTHETIC_AUS))
    for emotion in EMOTIONS
}


def emotion_of(aus: Sequence[int]) -> list[str] | None:
    """The emotion whose synthetic prototype is exactly ``aus``, or None when no prototype matches."""
    key = tuple(sorted(aus))
    matches = [e for e, proto in SYNTHETIC_PROTOTYPES.items() if proto == key]
    return matches or None


def _independent_aus(rng: random.Random) -> list[int]:
    aus = {au for au in SYNTHETIC_AUS if rng.random() < INDEPENDENT_P}
    for a, b in EXCLUSIVE_PAIRS:
        if a in aus and b in aus:
            aus.discard(rng.choice((a, b)))
    return _close_labels(aus)


def sample_labels(rng: random.Random, mode: Literal["mixed", "independent", "prototype"] = "mixed") -> dict:
    """Draw one face's labels: ``{"aus": sorted list[int], "emotions": list[str] | None}``.

    independent: each AU on with ``INDEPENDENT_P``; emotions only if the set is exactly a prototype.
    prototype: a uniformly chosen emotion (neutral included) and its synthetic prototype.
    mixed: independent / prototype / neutral with ``MIXED_WEIGHTS``.
    """
    if mode not in ("mixed", "independent", "prototype"):
        raise ValueError(f"sample_labels mode must be 'mixed', 'independent' or 'prototype', got {mode!r}")
    kind = rng.choices(list(MIXED_WEIGHTS), weights=list(MIXED_WEIGHTS.values()))[0] if mode == "mixed" else mode
    if kind == "neutral":
        return {"aus": [], "emotions": ["neutral"]}
    if kind == "independent":
        aus = _independent_aus(rng)
        return {"aus": aus, "emotions": emotion_of(aus)}
    # "mixed" draws neutral faces separately above, so its prototypes are the 7 non-neutral ones.
    choices = [e for e in EMOTIONS if e != "neutral"] if mode == "mixed" else list(EMOTIONS)
    emotion = rng.choice(choices)
    return {"aus": list(SYNTHETIC_PROTOTYPES[emotion]), "emotions": [emotion]}


# ---------------------------------------------------------------- nuisances


@dataclass(frozen=True)
class FaceStyle:
    """Everything about a face that is not an AU (the nuisance variation)."""

    skin: RGB
    hair: RGB  # hair and eyebrows
    iris: RGB
    background: RGB
    aspect: float  # face height / width
    scale: float  # overall size factor
    angle: float  # in-plane rotation, degrees
    shift: Point  # centre offset in 64-px units


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> RGB:
    """Linear blend of two colours: t=0 gives a, t=1 gives b."""
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _background(rng: random.Random, skin: RGB) -> RGB:
    """A random background colour far enough from the skin that the face outline is visible."""
    while True:
        bg = (rng.randint(20, 235), rng.randint(20, 235), rng.randint(20, 235))
        if sum(abs(x - y) for x, y in zip(bg, skin, strict=True)) > 120:
            return bg


def sample_style(rng: random.Random) -> FaceStyle:
    """Draw the nuisance variables of one face."""
    skin = _mix((246, 218, 192), (128, 88, 64), rng.random())
    hair = _mix((25, 20, 18), (110, 70, 40), rng.random() ** 2)
    iris = rng.choice([(60, 40, 25), (40, 70, 110), (50, 80, 50), (30, 30, 30)])
    return FaceStyle(
        skin=skin,
        hair=hair,
        iris=iris,
        background=_background(rng, skin),
        aspect=rng.uniform(1.12, 1.32),
        scale=rng.uniform(0.9, 1.1),
        angle=rng.uniform(-8.0, 8.0),
        shift=(rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)),
    )


def subject_style(subject: str, rng: random.Random) -> FaceStyle:
    """A face of one identity: skin, hair, iris and face shape fixed by the subject's id (the same in every
    process), background and pose (size, rotation, offset) drawn per face from ``rng``."""
    identity = sample_style(random.Random(f"expblip-subject/{subject}"))
    return dataclasses.replace(identity, background=_background(rng, identity.skin), scale=rng.uniform(0.9, 1.1),
                               angle=rng.uniform(-8.0, 8.0), shift=(rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0)))


# ---------------------------------------------------------------- pen: 64-px face units -> canvas


FACE_CENTRE: Point = (32.0, 31.0)


@dataclass
class _Pen:
    """Draws in 64-px face units; scale, rotation, shift and supersampling are applied here."""

    draw: ImageDraw.ImageDraw
    style: FaceStyle
    unit: float  # canvas pixels per face unit (size / 64 * SUPERSAMPLE)

    def pt(self, p: Point) -> Point:
        cx, cy = FACE_CENTRE
        a = math.radians(self.style.angle)
        x, y = (p[0] - cx) * self.style.scale, (p[1] - cy) * self.style.scale
        xr, yr = x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)
        return ((xr + cx + self.style.shift[0]) * self.unit, (yr + cy + self.style.shift[1]) * self.unit)

    def poly(self, points: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon([self.pt(p) for p in points], fill=fill)

    def line(self, points: Sequence[Point], fill: RGB, width: float) -> None:
        w = max(1, round(width * self.style.scale * self.unit))
        self.draw.line([self.pt(p) for p in points], fill=fill, width=w, joint="curve")


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> list[Point]:
    return [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _arc(x0: float, x1: float, y_of: Callable[[float], float], n: int = 16) -> list[Point]:
    """Points along x0..x1 with y given by ``y_of(t)``, t running -1..1."""
    return [(x0 + (x1 - x0) * (k / n), y_of(2 * k / n - 1)) for k in range(n + 1)]


# ---------------------------------------------------------------- face parts


def _draw_head(pen: _Pen, aus: set[int]) -> None:
    """Hair cap, then the face oval; a dropped jaw (26) stretches the lower half down."""
    cx, cy = FACE_CENTRE
    ry = 24.0
    rx = ry / pen.style.aspect
    ry_low = ry + (5.0 if 26 in aus else 0.0)
    pen.poly(_ellipse(cx, cy - 3.5, rx + 2.5, ry - 1.0)[24:] + [(cx + rx + 2.5, cy - 3.5)], pen.style.hair)
    oval = [(x, y if y <= cy else cy + (y - cy) * ry_low / ry) for x, y in _ellipse(cx, cy, rx, ry)]
    pen.poly(oval, pen.style.skin)


def _brow_points(aus: set[int], side: int) -> list[Point]:
    """Inner, middle and outer brow points for one side (side -1: image left, +1: image right)."""
    inner_dx, inner_y, mid_y, outer_y = 4.5, 21.5, 20.3, 22.0
    if 1 in aus:
        inner_y -= 4.5
        mid_y -= 1.5
    if 2 in aus:
        outer_y -= 4.5
        mid_y -= 2.0
    if 4 in aus:
        inner_dx -= 2.0
        inner_y, mid_y, outer_y = inner_y + 3.5, mid_y + 2.5, outer_y + 1.5
    cx = FACE_CENTRE[0]
    return [(cx + side * inner_dx, inner_y), (cx + side * 9.5, mid_y), (cx + side * 14.5, outer_y)]


def _draw_brows(pen: _Pen, aus: set[int]) -> None:
    """Eyebrows plus the wrinkles their AUs produce (forehead lines for 1/2, frown lines for 4)."""
    crease = _mix(pen.style.skin, (60, 35, 25), 0.55)
    cx = FACE_CENTRE[0]
    if 1 in aus:
        for y in (11.5, 14.0):
            pen.line(_arc(cx - 5, cx + 5, lambda t, y=y: y + 0.8 * t * t), crease, 0.9)
    if 2 in aus:
        for side in (-1, 1):
            for y in (12.0, 14.5):
                pen.line([(cx + side * 8.5, y + 0.3), (cx + side * 14.5, y + 1.5)], crease, 0.9)
    if 4 in aus:
        for side in (-1, 1):
            pen.line([(cx + side * 1.3, 22.0), (cx + side * 1.0, 27.0)], crease, 1.0)
    for side in (-1, 1):
        pen.line(_brow_points(aus, side), pen.style.hair, 2.0)


def _eye_shape(aus: set[int]) -> tuple[float, float]:
    """Upper and lower half-heights of the eye opening (5 widens it, 6 pushes the lower lid up)."""
    upper = 4.6 if 5 in aus else 2.6
    lower = 0.7 if 6 in aus else 2.2
    return upper, lower


def _draw_eye(pen: _Pen, aus: set[int], cx: float, cy: float) -> None:
    """One eye: white almond, iris clipped to it, dark upper lid line; a single lid line if closed (43)."""
    hw, lid = 4.6, _mix(pen.style.hair, (0, 0, 0), 0.5)
    if 43 in aus:
        pen.line(_arc(cx - hw, cx + hw, lambda t: cy + 0.6 - 1.4 * (1 - t * t)), lid, 1.4)
        pen.line(_arc(cx - hw + 1, cx + hw - 1, lambda t: cy + 1.2 + 0.6 * (1 - t * t)), lid, 0.6)  # lashes
        return
    up, low = _eye_shape(aus)
    top = _arc(cx - hw, cx + hw, lambda t: cy - up * (1 - t * t))
    bottom = _arc(cx - hw, cx + hw, lambda t: cy + low * (1 - t * t))
    pen.poly(top + bottom[::-1], (240, 240, 236))
    iris = []
    for x, y in _ellipse(cx, cy + (0.3 if 5 in aus else 0.0), 2.1, 2.1, 24):
        t = (x - cx) / hw
        iris.append((x, min(max(y, cy - up * (1 - t * t)), cy + low * (1 - t * t))))
    pen.poly(iris, pen.style.iris)
    pen.line(top, lid, 1.0)
    pen.line(bottom, _mix(pen.style.skin, lid, 0.5), 0.5)


def _draw_eyes_and_cheeks(pen: _Pen, aus: set[int]) -> None:
    """Both eyes; a cheek raise (6) adds cheek bulges, an under-eye fold and crow's feet."""
    cx, eye_y = FACE_CENTRE[0], 28.0
    if 6 in aus:
        blush, fold = _mix(pen.style.skin, (200, 70, 70), 0.35), _mix(pen.style.skin, (60, 35, 25), 0.5)
        for side in (-1, 1):
            pen.poly(_ellipse(cx + side * 11.0, 37.0, 4.5, 3.3, 24), blush)
            pen.line(_arc(cx + side * 13.5, cx + side * 6.5, lambda t: eye_y + 3.4 + 0.8 * (1 - t * t)), fold, 0.8)
            for dy in (-1.5, 0.5, 2.5):
                pen.line([(cx + side * 15.2, eye_y + dy * 0.6), (cx + side * 18.0, eye_y + dy)], fold, 0.7)
    for side in (-1, 1):
        _draw_eye(pen, aus, cx + side * 9.5, eye_y)


def _draw_nose(pen: _Pen, aus: set[int]) -> None:
    """Nostrils and tip shadow; a nose wrinkle (9) adds bridge lines, raises the nostrils, deepens nasolabial folds."""
    cx = FACE_CENTRE[0]
    shade, dark = _mix(pen.style.skin, (60, 35, 25), 0.35), _mix(pen.style.skin, (30, 15, 10), 0.7)
    base_y = 37.5 if 9 in aus else 39.0
    pen.line(_arc(cx - 3.2, cx + 3.2, lambda t: base_y - 0.8 * (1 - t * t)), shade, 0.8)
    for side in (-1, 1):
        pen.poly(_ellipse(cx + side * 1.9, base_y + 0.4, 1.1, 0.65, 12), dark)
    if 9 in aus:
        crease = _mix(pen.style.skin, (60, 35, 25), 0.6)
        for y in (29.5, 31.5, 33.5):
            pen.line([(cx - 2.6, y + 0.5), (cx, y), (cx + 2.6, y + 0.5)], crease, 0.8)
        for side in (-1, 1):
            pen.line([(cx + side * 4.0, 37.0), (cx + side * 6.5, 40.5), (cx + side * 8.0, 44.5)], crease, 0.9)


@dataclass(frozen=True)
class _Mouth:
    """Mouth geometry in face units: centre line y(t) = y + (corner_y - y) * t^2."""

    y: float
    half_width: float
    corner_lift: float  # + raises the corners (12), - lowers them (15)
    gap: float  # lip opening at the centre
    upper: float  # upper lip thickness
    lower: float  # lower lip thickness


def _mouth_geometry(aus: set[int]) -> _Mouth:
    half_width, lift, thick = 7.5, 0.0, 1.0
    if 20 in aus:
        half_width, thick = half_width + 4.5, 0.65
    if 12 in aus:
        half_width, lift = half_width + 1.0, 4.5
    if 15 in aus:
        lift = -4.5
    gap = 8.0 if 26 in aus else 3.0 if 25 in aus else 0.0
    y = 49.0 if 26 in aus else 47.5
    return _Mouth(y, half_width, lift, gap, 1.8 * thick, 2.3 * thick)


def _draw_mouth(pen: _Pen, aus: set[int]) -> None:
    """Lips, and for parted lips (25/26) a dark cavity with an upper row of teeth."""
    m, cx = _mouth_geometry(aus), FACE_CENTRE[0]
    x0, x1 = cx - m.half_width, cx + m.half_width

    def centre(t: float) -> float:
        return m.y - m.corner_lift * t * t

    def env(t: float) -> float:
        return max(0.0, 1 - t * t)

    lips = _mix(pen.style.skin, (170, 40, 50), 0.45)
    top = _arc(x0, x1, lambda t: centre(t) - m.gap / 2 * env(t) - m.upper * env(t) ** 0.5)
    bottom = _arc(x0, x1, lambda t: centre(t) + m.gap / 2 * env(t) + m.lower * env(t) ** 0.5)
    pen.poly(top + bottom[::-1], lips)
    if m.gap > 0:
        inner_top = _arc(x0, x1, lambda t: centre(t) - m.gap / 2 * env(t))
        inner_bottom = _arc(x0, x1, lambda t: centre(t) + m.gap / 2 * env(t))
        teeth = _arc(x0, x1, lambda t: centre(t) - m.gap / 2 * env(t) + min(1.4, m.gap / 3) * env(t))
        pen.poly(inner_top + inner_bottom[::-1], (45, 12, 18))
        pen.poly(inner_top + teeth[::-1], (235, 232, 220))
    else:
        pen.line(_arc(x0, x1, centre), _mix(lips, (40, 10, 15), 0.6), 0.7)


# ---------------------------------------------------------------- image


def _add_noise(img: Image.Image, rng: random.Random) -> Image.Image:
    """Gaussian pixel noise, seeded from ``rng`` so a face is reproducible."""
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, NOISE_SIGMA, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).round().astype(np.uint8), "RGB")


def draw_face(aus: Iterable[int], rng: random.Random, size: int = 64, style: FaceStyle | None = None) -> Image.Image:
    """Draw one RGB face of ``size`` px showing exactly ``aus`` (a subset of ``SYNTHETIC_AUS``), in ``style`` (a
    subject's, :func:`subject_style`) or a style of its own drawn from ``rng``."""
    active = set(validate_aus(aus))
    undrawable = sorted(active - set(SYNTHETIC_AUS))
    if undrawable:
        raise ValueError(f"the synthetic world cannot draw AU(s) {undrawable}; it draws {list(SYNTHETIC_AUS)}")
    style = style or sample_style(rng)
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), style.background)
    pen = _Pen(ImageDraw.Draw(canvas), style, unit=size / 64 * SUPERSAMPLE)
    _draw_head(pen, active)
    _draw_brows(pen, active)
    _draw_eyes_and_cheeks(pen, active)
    _draw_nose(pen, active)
    _draw_mouth(pen, active)
    return _add_noise(canvas.resize((size, size), Image.Resampling.LANCZOS), rng)


def _record_rng(seed: int, split: str, index: int) -> random.Random:
    # One generator per record (string seeds hash deterministically): record i is the same
    # whatever n is, and records can be regenerated individually.
    return random.Random(f"synthetic/{split}/{seed}/{index}")


def synthetic_records(
    n: int, seed: int = 0, image_size: int = 64, caption: CaptionConfig | None = None, split: str = "train"
) -> Iterator[dict]:
    """Yield ``n`` labelled, captioned synthetic faces; deterministic given (seed, split, index)."""
    cfg = caption or CaptionConfig(style="au")
    for i in range(n):
        rng = _record_rng(seed, split, i)
        drawn = sample_labels(rng)
        labels = {"aus": drawn["aus"], "emotions": drawn["emotions"], "dataset": "synthetic", "subject": None}
        yield {
            "key": f"synthetic-{split}-{seed}-{i:07d}",
            "image": draw_face(labels["aus"], rng, image_size),
            "labels": labels,
            "captions": captions_for(labels, cfg),
        }


def save_contact_sheet(records: Iterable[dict], path: str | Path, columns: int = 8, zoom: int = 2) -> Path:
    """Write a PNG grid of the records' faces, each captioned with its AU numbers (and emotion)."""
    records = list(records)
    if not records:
        raise ValueError("save_contact_sheet() got no records")
    cell = records[0]["image"].width * zoom
    rows = math.ceil(len(records) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 24)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, rec in enumerate(records):
        x, y = (k % columns) * cell, (k // columns) * (cell + 24)
        sheet.paste(rec["image"].resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        aus = rec["labels"]["aus"]
        emotions = rec["labels"].get("emotions")
        draw.text((x + 2, y + cell + 1), " ".join(map(str, aus)) or "-", fill=(0, 0, 0))
        draw.text((x + 2, y + cell + 12), ",".join(emotions) if emotions else "", fill=(120, 0, 0))
    path = Path(path)
    sheet.save(path)
    return path
