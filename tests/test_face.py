"""Offline face detection (skimage's LBP cascade) and square crops, on skimage's astronaut photo."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import launch_module
from PIL import Image
from skimage import data

from expblip.infer.face import Box, crop_face, detect_faces, square_around

ASTRONAUT_FACE = Box(x=165, y=55, width=110, height=120)  # Eileen Collins' face in the 512x512 photo, by eye


def _iou(a: Box, b: Box) -> float:
    w = max(0, min(a.x + a.width, b.x + b.width) - max(a.x, b.x))
    h = max(0, min(a.y + a.height, b.y + b.height) - max(a.y, b.y))
    return w * h / (a.area + b.area - w * h)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())  # 512x512 RGB, one frontal face, shipped inside scikit-image


def test_detects_the_astronaut_face(astronaut):
    faces = detect_faces(astronaut)
    assert faces, "the LBP cascade found no face in skimage.data.astronaut()"
    assert _iou(faces[0], ASTRONAUT_FACE) > 0.5, faces
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)  # largest first


def test_detection_is_in_original_pixels_whatever_the_scale(astronaut):
    big = astronaut.resize((1024, 1024))  # scanned at 320 px: the box must come back in 1024-px coordinates
    face = detect_faces(big)[0]
    doubled = Box(ASTRONAUT_FACE.x * 2, ASTRONAUT_FACE.y * 2, ASTRONAUT_FACE.width * 2, ASTRONAUT_FACE.height * 2)
    assert _iou(face, doubled) > 0.5, face


def test_crop_is_a_square_around_the_face(astronaut):
    crop, face = crop_face(astronaut, margin=0.25)
    assert face is not None and crop.width == crop.height
    assert crop.width == pytest.approx(max(face.width, face.height) * 1.5, abs=2)
    left, top, _, _ = square_around(face, astronaut.width, astronaut.height, 0.25)
    expected = np.asarray(astronaut)[top : top + crop.height, left : left + crop.width]
    np.testing.assert_array_equal(np.asarray(crop), expected)  # pixels are the photo's, not resampled
    cx, cy = face.centre
    assert abs(left + crop.width / 2 - cx) <= 1 and abs(top + crop.height / 2 - cy) <= 1


def test_no_face_falls_back_to_the_centre_square_and_says_so():
    ramp = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))  # 300 wide, 200 high, no face
    photo = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    assert detect_faces(photo) == []
    result = crop_face(photo)
    assert result.face is None  # the flag: nothing found, the centre square was used
    assert result.image.size == (200, 200)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(photo)[:, 50:250])


def test_square_around_stays_inside_the_image():
    corner = Box(x=0, y=0, width=40, height=60)  # at the top-left corner: the square is shifted, not cut
    assert square_around(corner, 100, 80, margin=0.5) == (0, 0, 80, 80)  # 60 * 2 = 120 -> shrunk to 80
    assert square_around(Box(70, 50, 20, 20), 100, 80, margin=0.25) == (65, 45, 95, 75)
    assert square_around(None, 100, 80) == (10, 0, 90, 80)
    with pytest.raises(ValueError, match="margin"):
        square_around(corner, 100, 80, margin=-0.1)


def test_tiny_images_have_no_face():
    assert detect_faces(Image.new("RGB", (16, 16))) == []  # smaller than the cascade's 24-px window
    crop, face = crop_face(Image.new("RGB", (16, 10)))
    assert face is None and crop.size == (10, 10)


def test_describe_cli_crop_face_names_the_face(tmp_path, tiny_run_dir, astronaut, capsys):
    import json

    export = tiny_run_dir / "export"
    astronaut.save(tmp_path / "astronaut.png")
    Image.new("RGB", (90, 60), "grey").save(tmp_path / "wall.png")
    describe = launch_module("describe")
    args = ["--model", str(export), "--beams", "1", "--max-new-tokens", "3", "--crop-face"]
    assert describe.main([*args, str(tmp_path / "astronaut.png"), str(tmp_path / "wall.png")]) == 0
    astronaut_line, wall_line = capsys.readouterr().out.strip().splitlines()
    face = detect_faces(astronaut)[0]
    assert astronaut_line.endswith(f"[face: {face.x},{face.y} {face.width}x{face.height}]")
    assert wall_line.endswith("[face: none found, centre square]")
    assert describe.main([*args, "--json", str(tmp_path / "wall.png")]) == 0
    assert json.loads(capsys.readouterr().out)["face"] is None
