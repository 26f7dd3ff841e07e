"""Offline face detection and square face crops, for photos that are not already face crops.

    boxes = detect_faces(photo)                  # [Box(x, y, width, height), ...], largest first
    crop, face = crop_face(photo, margin=0.25)   # square PIL image; face is None when no face was found

Exp-BLIP is trained on aligned face crops, so a whole photo (a person at a desk, a group) reads badly; the served
model sees the square around the largest face instead. The detector is scikit-image's LBP frontal-face cascade,
whose weights ship inside the skimage wheel (``skimage.data.lbp_frontal_face_cascade_filename()``): nothing is
downloaded. It finds upright frontal faces; profiles and strongly rotated heads fall back to the centre square.

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image

WORK_SIZE = 320  # the longest side the detector scans; 512 px takes ~4x longer and finds the same faces
MIN_FACE = 0.1  # faces narrower than this fraction of the shorter side are not the subject of the photo
CASCADE_WINDOW = 24  # the LBP cascade's own window (pixels): no smaller face can be found


@dataclass(frozen=True)
class Box:
    """A face rectangle in the pixel coordinates of the image it was found in (x right, y down)."""

    x: int  # left column
    y: int  # top row
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class FaceCrop(NamedTuple):
    """What ``crop_face`` returns: the square crop and the face it is centred on (None: no face, centre square)."""

    image: Image.Image
    face: Box | None


@cache
def _cascade():
    """The LBP frontal-face cascade shipped inside scikit-image (loaded once per process)."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    return Cascade(lbp_frontal_face_cascade_filename())


def detect_faces(image: Image.Image, scale_factor: float = 1.2, min_face: float = MIN_FACE,
                 work_size: int = WORK_SIZE) -> list[Box]:
    """Upright frontal faces in ``image``, largest first, in its own pixel coordinates.

    The image is scanned as greyscale, shrunk so that its longest side is at most ``work_size``; windows grow by
    ``scale_factor`` from ``min_face`` of the shorter side (at least the cascade's 24 px) to the whole shorter side.
    """
    grey = image.convert("L")
    scale = min(1.0, work_size / max(grey.size))
    if scale < 1.0:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.BILINEAR)
    short = min(grey.size)
    smallest = max(CASCADE_WINDOW, round(min_face * short))
    if short < smallest:
        return []
    pixels = np.asarray(grey, dtype=np.float32) / 255.0  # [H, W] in [0, 1]
    found = _cascade().detect_multi_scale(img=pixels, scale_factor=scale_factor, step_ratio=1,
                                          min_size=(smallest, smallest), max_size=(short, short))
    boxes = [Box(round(d["c"] / scale), round(d["r"] / scale), round(d["width"] / scale), round(d["height"] / scale))
             for d in found]
    return sorted(boxes, key=lambda b: (-b.area, b.y, b.x))


def square_around(box: Box | None, width: int, height: int, margin: float = 0.25) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square crop: ``box`` grown by ``margin`` of its side on every side, or the
    centre square when ``box`` is None; shrunk to the shorter image side and shifted to stay inside the image."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a fraction of the face side added on each side), got {margin}")
    short = min(width, height)
    if box is None:
        side, (cx, cy) = short, (width / 2, height / 2)
    else:
        side, (cx, cy) = min(short, round(max(box.width, box.height) * (1 + 2 * margin))), box.centre
    left = int(min(max(round(cx - side / 2), 0), width - side))
    top = int(min(max(round(cy - side / 2), 0), height - side))
    return left, top, left + side, top + side


def crop_face(image: Image.Image, margin: float = 0.25) -> FaceCrop:
    """The square crop around the largest face, ``margin`` of its side added on each side (as ``(image, face)``).

    When no face is found the crop is the centre square of the whole image and ``face`` is None, so a caller can
    say that the description is of the whole photo.
    """
    faces = detect_faces(image)
    face = faces[0] if faces else None
    return FaceCrop(image.crop(square_around(face, image.width, image.height, margin)), face)
