"""Synthetic stand-ins for BP4D and DISFA: the synthetic-face world written out in each dataset's own layout.

No real face dataset can be downloaded here, yet the protocol (subject-exclusive folds, one export per fold,
per-AU F1 per fold) must run end to end on files laid out exactly as the converters read real copies. A stand-in
has every subject of the field's published folds (expblip.data.sources.folds), a few frames per subject, faces
drawn by expblip.data.synthetic from their labels, and label files in the release's format:

    BP4D:  ROOT/AUCoding/AU_OCC/F001_T1.csv + ROOT/2D+3D/F001/T1/0100.jpg (frame numbers from FIRST_FRAME)
    DISFA: ROOT/ActionUnit_Labels/SN001/SN001_au1.txt (frames from 1) + ROOT/Images_LeftCamera/SN001/00001.jpg,
           or with ``frame_base=0`` ME-GraphAU's ROOT/img/SN001/0.png (numbered from 0)

Only the AUs both the world draws and the dataset labels can be present (BP4D: 1 2 4 6 12 15; DISFA: 1 2 4 5 6 9
12 15 20 25 26); the world's other AUs are drawn but unlabelled, as real faces show uncoded AUs. Numbers measured
on a stand-in say that the protocol runs, never how a model does on the real dataset.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from expblip.data.facs import DATASET_AUS
from expblip.data.sources.folds import PUBLISHED_PARTS
from expblip.data.synthetic import draw_face, sample_labels

FIRST_FRAME = 100  # BP4D's coded segments start mid-video; any number works
BP4D_COLUMNS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_PRESENT = 3  # intensity written for a present AU (>= 2 counts as present)


@dataclass
class StandinConfig:
    """One stand-in tree."""

    dataset: Literal["bp4d", "disfa"]
    root: str  # the folder to write ROOT into (created)
    frames: int = 10  # labelled frames per subject (and task)
    tasks: int = 1  # BP4D: tasks T1..Tn per subject
    subjects: tuple[str, ...] = ()  # () = every subject of the published folds
    image_size: int = 64
    seed: int = 0
    frame_base: int = 1  # DISFA: 1 = Images_LeftCamera/SN001/00001.jpg, 0 = img/SN001/0.png (ME-GraphAU)

    def __post_init__(self) -> None:
        if self.dataset not in PUBLISHED_PARTS:
            raise ValueError(f"stand-ins exist for {sorted(PUBLISHED_PARTS)}, not {self.dataset!r}")
        if self.frames < 1 or self.tasks < 1 or self.frame_base not in (0, 1):
            raise ValueError("frames and tasks must be >= 1 and frame_base 0 or 1")

    @property
    def subject_ids(self) -> tuple[str, ...]:
        return self.subjects or tuple(sorted(s for part in PUBLISHED_PARTS[self.dataset] for s in part))


def _face(rng: random.Random, size: int, fmt: str = "JPEG") -> tuple[bytes, list[int]]:
    """(encoded image, drawn AUs) of one synthetic face."""
    aus = sample_labels(rng)["aus"]
    buf = io.BytesIO()
    draw_face(aus, rng, size).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue(), aus


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _bp4d_sequence(root: Path, subject: str, task: str, cfg: StandinConfig, rng: random.Random) -> None:
    rows = ["0," + ",".join(map(str, BP4D_COLUMNS))]
    for frame in range(FIRST_FRAME, FIRST_FRAME + cfg.frames):
        image, aus = _face(rng, cfg.image_size)
        _write(root / "2D+3D" / subject / task / f"{frame:04d}.jpg", image)
        rows.append(",".join([str(frame), *(str(int(au in aus)) for au in BP4D_COLUMNS)]))
    _write(root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv", "\n".join(rows) + "\n")


def _disfa_subject(root: Path, subject: str, cfg: StandinConfig, rng: random.Random) -> None:
    drawn = []
    for frame in range(1, cfg.frames + 1):  # DISFA's label files count frames from 1
        image, aus = _face(rng, cfg.image_size, "PNG" if cfg.frame_base == 0 else "JPEG")
        drawn.append(aus)
        zero_based, one_based = f"img/{subject}/{frame - 1}.png", f"Images_LeftCamera/{subject}/{frame:05d}.jpg"
        _write(root / (zero_based if cfg.frame_base == 0 else one_based), image)
    for au in DATASET_AUS["disfa"]:
        lines = [f"{f},{DISFA_PRESENT if au in aus else 0}" for f, aus in enumerate(drawn, 1)]
        _write(root / "ActionUnit_Labels" / subject / f"{subject}_au{au}.txt", "\n".join(lines) + "\n")


def write_standin(cfg: StandinConfig) -> Path:
    """Write the stand-in tree; returns its root. Deterministic given the config."""
    root = Path(cfg.root)
    for subject in cfg.subject_ids:
        rng = random.Random(f"standin/{cfg.dataset}/{cfg.seed}/{subject}")
        if cfg.dataset == "bp4d":
            for t in range(1, cfg.tasks + 1):
                _bp4d_sequence(root, subject, f"T{t}", cfg, rng)
        else:
            _disfa_subject(root, subject, cfg, rng)
    (root / "STANDIN.txt").write_text(f"synthetic stand-in for {cfg.dataset} written by expblip.data.standin; "
                                      "not the real dataset\n")
    return root
