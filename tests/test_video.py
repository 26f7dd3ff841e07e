"""Video: a real clip encoded and decoded with PyAV whose face changes expression at 2.0 s; the per-frame captions,
the CSV, the JSON and the timeline show the change at 2.0 s, from the library, describe.py and POST /describe/video.

A random tiny model cannot describe faces, so the captioner here is scripted: it names the expression of the
reference face nearest to each decoded frame (decoding, sampling and timing are real)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import random
from dataclasses import fields
from pathlib import Path

import av
import pytest
import torch
from conftest import launch_module
from PIL import Image
from test_serve import post_file

from expblip.data.captions import au_caption, concat_fusion, emotion_caption
from expblip.data.synthetic import draw_face
from expblip.infer.captioner import Captioner
from expblip.infer.video import VideoError, VideoLimits, activation_spans, describe_video_file, sample_frames
from expblip.model.blip2 import Generated
from expblip.serve.app import background_server, create_app

SWITCH_S, LENGTH_S, RATE = 2.0, 4.0, 10  # neutral until 2.0 s, then a smile (AU6 + AU12), 10 frames/s
EXPRESSIONS = {"neutral": ([], ["neutral"]), "smile": ([6, 12], ["happiness"])}


def expression_face(name: str) -> Image.Image:
    return draw_face(EXPRESSIONS[name][0], random.Random(3), size=64)


def write_clip(path: Path, codec: str = "mpeg4") -> Path:
    """LENGTH_S seconds at RATE frames/s: the neutral face, then the smiling one from SWITCH_S on."""
    faces = {name: expression_face(name) for name in EXPRESSIONS}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.bit_rate = 2_000_000  # ample for 64 px: the faces survive the encoder
        for i in range(int(LENGTH_S * RATE)):
            face = faces["smile" if i / RATE >= SWITCH_S else "neutral"]
            for packet in stream.encode(av.VideoFrame.from_image(face)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class NearestFaceCaptioner(Captioner):
    """Captions each image with the expression of the nearest reference face (pixel distance)."""

    references: dict[str, torch.Tensor]

    def caption_pixels(self, pixel_values, gen=None, prompt="", with_lengths=False):
        captions = []
        for pixels in pixel_values:
            name = min(self.references, key=lambda n: float(((self.references[n] - pixels) ** 2).mean()))
            aus, emotions = EXPRESSIONS[name]
            captions.append(concat_fusion(au_caption(aus), emotion_caption(emotions)))
        return [Generated(c, 10, True) for c in captions] if with_lengths else captions


@pytest.fixture(scope="module")
def scripted(tiny_run_dir) -> NearestFaceCaptioner:
    base = Captioner.from_export(tiny_run_dir / "export")
    captioner = NearestFaceCaptioner(**{f.name: getattr(base, f.name) for f in fields(Captioner)})
    captioner.references = {n: captioner.preprocess([expression_face(n)])[0] for n in EXPRESSIONS}
    return captioner


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def assert_change_at_switch(rows: list[dict], fps: float) -> None:
    """Frame k is the first source frame at or after k / fps; the smile starts at SWITCH_S exactly."""
    wanted = [math.ceil(round(k / fps * RATE, 6)) / RATE for k in range(math.ceil(LENGTH_S * fps))]
    assert [r["time"] for r in rows] == pytest.approx(wanted)
    assert [r["end"] for r in rows] == pytest.approx(wanted[1:] + [LENGTH_S])
    for row in rows:
        assert row["aus"] == ([6, 12] if row["time"] >= SWITCH_S else [])
        assert row["emotions"] == (["happiness"] if row["time"] >= SWITCH_S else ["neutral"])
    spans = activation_spans(rows)
    assert spans == {6: [[SWITCH_S, LENGTH_S]], 12: [[SWITCH_S, LENGTH_S]]}
    assert activation_spans(rows, "emotions") == {"neutral": [[0.0, SWITCH_S]], "happiness": [[SWITCH_S, LENGTH_S]]}


@pytest.mark.parametrize("fps", [2.0, 4.0])
def test_frames_are_sampled_at_the_right_times_and_the_change_is_found(scripted, clip, fps):
    frames = sample_frames(clip, fps)
    assert all(f.image.size == (64, 64) for f in frames)
    assert_change_at_switch(describe_video_file(scripted, clip, fps, batch_size=3), fps)


def test_describe_py_writes_json_csv_and_the_timeline(scripted, clip, tiny_run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Captioner, "from_export", classmethod(lambda cls, *a, **k: scripted))
    out = tmp_path / "out"
    assert launch_module("describe").main(["--model", str(tiny_run_dir), str(clip), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 8 and lines[4].startswith(f"{clip}@2.00s: ") and "[AUs: 6, 12]" in lines[4]
    assert "[AUs: none] [emotion: neutral]" in lines[3]
    assert "8 frames" in captured.err and "timeline.png" in captured.err
    summary = json.loads((out / "frames.json").read_text())
    assert_change_at_switch(summary["frames"], 2.0)
    assert summary["timeline"]["aus"] == {"6": [[2.0, 4.0]], "12": [[2.0, 4.0]]}
    table = list(csv.DictReader((out / "frames.csv").open()))
    assert [r["AU12"] for r in table] == ["0"] * 4 + ["1"] * 4 and table[4]["time"] == "2.000"
    plot = Image.open(out / "timeline.png")
    assert plot.format == "PNG" and plot.size[0] >= 800


def test_http_video_route_answers_frames_spans_and_the_plot(scripted, clip):
    app = create_app(scripted, max_wait_ms=1, video_limits=VideoLimits(max_frames=20, max_seconds=10))
    with background_server(app) as url:
        status, body = post_file(f"{url}/describe/video?fps=4", clip.read_bytes(), "clip.mp4", "video/mp4",
                                 field="video")
        assert status == 200, body
        assert_change_at_switch(body["frames"], 4.0)
        assert body["video"] == {"name": "clip.mp4", "frames": 16, "fps": 4.0}
        png = base64.b64decode(body["timeline_png"].removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).format == "PNG"
        status, body = post_file(f"{url}/describe/video", b"just notes", "notes.mp4", "video/mp4", field="video")
        assert status == 415 and "notes.mp4" in body["error"]
        status, body = post_file(f"{url}/describe/video?fps=8", clip.read_bytes(), "clip.mp4", "video/mp4",
                                 field="video")
        assert status == 413 and "lower fps" in body["error"]  # 4 s at 8 frames/s is above 20 frames


def test_limits_and_non_videos_are_refused_before_decoding(clip, tmp_path):
    with pytest.raises(VideoError, match="above the 3-frame limit; lower fps") as info:
        sample_frames(clip, 2.0, VideoLimits(max_frames=3))
    assert info.value.kind == "too_large"
    with pytest.raises(VideoError, match="longer than the 1 s limit"):
        sample_frames(clip, 2.0, VideoLimits(max_seconds=1))
    with pytest.raises(VideoError, match="pixel limit"):
        sample_frames(clip, 2.0, VideoLimits(max_pixels=32 * 32))
    png = tmp_path / "face.mp4"
    expression_face("smile").save(png, "PNG")
    with pytest.raises(VideoError, match="not an MP4/MOV, MKV/WebM or AVI"):
        sample_frames(png)
    playlist = tmp_path / "list.mp4"
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/hostname\n")  # FFmpeg's HLS demuxer is never reached
    with pytest.raises(VideoError, match="unrecognised first bytes"):
        sample_frames(playlist)


def test_faces_are_cropped_per_frame(scripted, tmp_path):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256))
    path = tmp_path / "astronaut.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=2)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_image(photo)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rows = describe_video_file(scripted, path, fps=2, crop_face=True)
    assert len(rows) == 2 and all(r["face"] and 70 < r["face"]["x"] < 110 for r in rows)



@pytest.mark.parametrize("rotation, size, red, blue", [(-90, (32, 64), (16, 16), (16, 48)),  # clockwise quarter
                                                       (90, (32, 64), (16, 48), (16, 16)),
                                                       (180, (64, 32), (48, 16), (16, 16))])
def test_a_sideways_phone_clip_is_turned_upright_by_its_display_matrix(tmp_path, rotation, size, red, blue):
    """A 64x32 clip, red left half, blue right half, stored with a display rotation (a portrait phone clip is -90):
    the frames come out as a player shows them (FFmpeg's autorotate: -90 turns clockwise, its left edge on top)."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        for packet in [*stream.encode(av.VideoFrame.from_image(stored)), *stream.encode()]:
            container.mux(packet)
    (frame,) = sample_frames(path, fps=2)
    r, _, b = frame.image.getpixel(red)
    r2, _, b2 = frame.image.getpixel(blue)
    assert frame.image.size == size and r > 200 > b and b2 > 200 > r2
