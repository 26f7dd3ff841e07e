"""make_shards openface / pyfeat: the per-frame CSVs OpenFace 2.0 and py-feat write for a video, plus the video or its
frames, become shards with pseudo-labels. Fixtures are written byte for byte as each tool writes them, on a few rows
and 8-px images (16-px video frames) in tmp_path."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_module
from PIL import Image

from expblip.data.shards import MANIFEST, read_manifest, resolve_shards
from expblip.data.sources import records
from expblip.data.sources._common import watch_skips

# ---------------------------------------------------------------- OpenFace 2.0
# Format: https://github.com/TadasBaltrusaitis/OpenFace/wiki/Output-Format, written by
# lib/local/Utilities/src/RecorderCSV.cpp (OpenFace 2.0.x): ", " between header names and between cells, frame from 1,
# timestamp %.3f, confidence %.2f, success 0/1, _r intensities %.2f, _c occurrences %.1f; FeatureExtraction with all
# outputs on (56 eye landmarks, 68 face landmarks, 34 shape modes). Aligned faces: <video>_aligned/frame_det_00_N.bmp.

OPENFACE_REG = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
                "AU20", "AU23", "AU25", "AU26", "AU45"]
OPENFACE_CLASS = sorted([*OPENFACE_REG, "AU28"])


def openface_header() -> list[str]:
    names = ["frame", "face_id", "timestamp", "confidence", "success", "gaze_0_x", "gaze_0_y", "gaze_0_z",
             "gaze_1_x", "gaze_1_y", "gaze_1_z", "gaze_angle_x", "gaze_angle_y"]
    names += [f"eye_lmk_{axis}_{i}" for axis in "xyXYZ" for i in range(56)]
    names += ["pose_Tx", "pose_Ty", "pose_Tz", "pose_Rx", "pose_Ry", "pose_Rz"]
    names += [f"{axis}_{i}" for axis in "xyXYZ" for i in range(68)]
    names += ["p_scale", "p_rx", "p_ry", "p_rz", "p_tx", "p_ty", *(f"p_{i}" for i in range(34))]
    return names + [f"{au}_r" for au in OPENFACE_REG] + [f"{au}_c" for au in OPENFACE_CLASS]


def openface_line(frame: int, time: float, confidence: float, success: int, present: set[str] = frozenset(),
                  intensity: dict[str, float] | None = None) -> str:
    cells = [str(frame), "0", f"{time:.3f}", f"{confidence:.2f}", str(success)]
    cells += ["0.000000"] * 6 + ["0.000"] * 2 + ["0.0"] * (56 * 5) + ["0.0"] * 3 + ["0.000"] * 3
    cells += ["0.0"] * (68 * 5) + ["0.000"] * 40
    cells += [f"{(intensity or {}).get(au, 0.0):.2f}" for au in OPENFACE_REG]
    cells += [f"{1.0 if au in present else 0.0:.1f}" for au in OPENFACE_CLASS]
    return ", ".join(cells) + "\n"


def write_openface(folder: Path, lines: list[str], name: str = "clip") -> tuple[Path, Path]:
    """processed/clip.csv and processed/clip_aligned/frame_det_00_00000N.bmp for each line's frame."""
    processed = folder / "processed"
    aligned = processed / f"{name}_aligned"
    aligned.mkdir(parents=True, exist_ok=True)
    for line in lines:
        frame = int(line.split(",")[0])
        Image.new("RGB", (8, 8), (frame * 20, 90, 160)).save(aligned / f"frame_det_00_{frame:06d}.bmp")
    path = processed / f"{name}.csv"
    path.write_text(", ".join(openface_header()) + "\n" + "".join(lines))
    return path, aligned


# ---------------------------------------------------------------- py-feat
# Format: https://py-feat.org/basic_tutorials/03_detector_vids.html; columns as feat/detector.py's _create_fex
# builds them (facebox, 68 landmarks, pose, 20 AU probabilities, 7 emotions, identity, input, frame from 0) plus
# detect_video's approx_time, the frame as index; saved with Fex.to_csv (pandas: ',' separated, NaN as an empty cell
# for frames where no face was found).

PYFEAT_AUS = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU11", "AU12", "AU14", "AU15", "AU17",
              "AU20", "AU23", "AU24", "AU25", "AU26", "AU28", "AU43"]
PYFEAT_EMOTIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
PYFEAT_COLUMNS = (["FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", "FaceScore"]
                  + [f"{axis}_{i}" for axis in "xy" for i in range(68)] + ["Pitch", "Roll", "Yaw"] + PYFEAT_AUS
                  + PYFEAT_EMOTIONS + ["Identity", *(f"Identity_{i + 1}" for i in range(512))]
                  + ["input", "frame", "approx_time"])


def pyfeat_row(frame: int, score: float | None, aus: dict[str, float] | None = None, emotion: str = "neutral",
               video: str = "clip.mp4") -> dict:
    row = {c: "" for c in PYFEAT_COLUMNS}  # a frame without a face: NaN, written as an empty cell
    row.update(input=video, frame=frame, approx_time=f"00:{frame // 10:02d}")
    if score is None:
        return row
    row.update({c: 0.0 for c in PYFEAT_COLUMNS[:-3]}, FaceRectWidth=6.5, FaceRectHeight=7.25, FaceScore=score)
    row.update({au: 0.1 for au in PYFEAT_AUS}, **(aus or {}))
    row.update({e: 0.05 for e in PYFEAT_EMOTIONS}, **{emotion: 0.7}, Identity="Person_0")
    return row


def write_pyfeat(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["frame", *PYFEAT_COLUMNS])  # the frame index detect_video sets, then the columns
        for row in rows:
            writer.writerow([row["frame"], *(repr(v) if isinstance(v, float) else v for v in row.values())])
    return path


def write_video(path: Path, frames: int, rate: int = 10) -> Path:
    """A 16-px MPEG-4 clip whose frame i is grey level 20 * i."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------- helpers


def make_shards(argv: list[str]) -> int:
    return launch_module("make_shards").main(argv)


def shard_samples(out: Path) -> list[tuple[str, dict, bytes]]:
    """(key, labels, image bytes) of every sample in the shards at ``out``."""
    samples: dict[str, dict] = {}
    for url in resolve_shards(str(out))[0]:
        with tarfile.open(url.removeprefix("file://")) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(k, json.loads(s["json"]), s.get("jpg") or s.get("png")) for k, s in samples.items()]


def convert(source: str, **options) -> tuple[list[dict], dict]:
    """Records of a tool source and its Skips' counts {"skipped": Counter, "dropped": Counter}."""
    with watch_skips() as found:
        recs = list(records(source, max_skipped=0.5, **options))
    return recs, {"skipped": sum((s.counts for s in found), Counter()),
                  "dropped": sum((s.dropped for s in found), Counter())}


def frames_of(recs: list[dict]) -> list[int]:
    return [r["labels"]["frame"] for r in recs]


# ---------------------------------------------------------------- OpenFace


def test_openface_csv_with_leading_spaces_converts_end_to_end(tmp_path):
    lines = [openface_line(1, 0.0, 0.98, 1, {"AU06", "AU12", "AU45"}),
             openface_line(2, 0.033, 0.97, 1, {"AU01", "AU02"}),
             openface_line(3, 0.067, 0.0, 0),  # tracking lost: success 0
             openface_line(4, 0.1, 0.55, 1, {"AU04"}),  # tracked, but below the 0.8 confidence floor
             openface_line(5, 0.133, 0.93, 1)]
    csv_path, aligned = write_openface(tmp_path, lines)
    assert csv_path.read_text().startswith("frame, face_id, timestamp, confidence, success, gaze_0_x, ")
    out = tmp_path / "shards"
    assert make_shards(["openface", "--csv", str(csv_path), "--frames", str(aligned), "--out", str(out)]) == 0
    manifest = read_manifest(str(out))
    assert manifest["total_samples"] == 3
    meta = manifest["meta"]
    assert (meta["source"], meta["pseudo_labels"], meta["label_tool"], meta["caption_style"]) == (
        "openface", True, "openface", "au")
    samples = {key: (labels, image) for key, labels, image in shard_samples(out)}
    assert sorted(samples) == ["openface-clip-000001", "openface-clip-000002", "openface-clip-000005"]
    first, image = samples["openface-clip-000001"]
    assert first["aus"] == [6, 12]  # AU45 (blink) is not in expblip's vocabulary
    assert (first["label_source"], first["subject"], first["frame"], first["time"]) == ("openface", "clip", 1, 0.0)
    assert first["captions"] == ["It is a people who raises cheek and pulls lip corner."]
    assert Image.open(io.BytesIO(image)).getpixel((0, 0)) == (20, 90, 160)  # the BMP of frame 1, as PNG
    assert samples["openface-clip-000005"][0]["aus"] == []  # tracked, no AU: labelled "no AU"

    _, counts = convert("openface", csv=str(csv_path), frames=str(aligned))
    assert counts["dropped"] == {"face not tracked (success 0)": 1, "confidence below 0.8": 1}
    assert not counts["skipped"]


def test_root_and_openfaces_own_layout(tmp_path):
    csv_path, _ = write_openface(tmp_path, [openface_line(1, 0.0, 0.98, 1, {"AU12"})])
    out = tmp_path / "shards"  # FeatureExtraction's processed/clip.csv + processed/clip_aligned: no --frames needed
    assert make_shards(["openface", "--root", str(csv_path.parent), "--csv", "clip.csv", "--out", str(out)]) == 0
    assert [labels["aus"] for _, labels, _ in shard_samples(out)] == [[12]]


def test_openface_intensities_with_a_threshold(tmp_path):
    lines = [openface_line(1, 0.0, 0.98, 1, {"AU12", "AU28"}, {"AU12": 2.5, "AU06": 1.2, "AU01": 0.4})]
    csv_path, aligned = write_openface(tmp_path, lines)
    (rec,), _ = convert("openface", csv=str(csv_path), frames=str(aligned), au_threshold=1.0)
    assert rec["labels"]["aus"] == [6, 12, 28]  # _r >= 1 where OpenFace has an intensity, AU28 from its _c
    assert rec["labels"]["au_intensity"]["12"] == 2.5 and "28" not in rec["labels"]["au_intensity"]
    (rec,), _ = convert("openface", csv=str(csv_path), frames=str(aligned), au_threshold=2.0)
    assert rec["labels"]["aus"] == [12, 28]


# ---------------------------------------------------------------- py-feat


def test_pyfeat_csv_and_video_convert_end_to_end(tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=6)
    rows = [pyfeat_row(0, 0.99, {"AU12": 0.91, "AU06": 0.7}, "happiness"),
            pyfeat_row(1, None),  # no face found: NaN everywhere
            pyfeat_row(2, 0.3, {"AU04": 0.9}),  # a face below the 0.5 FaceScore floor
            pyfeat_row(3, 0.62, {"AU01": 0.8}, "surprise"),  # two faces in frame 3: the more confident is kept
            pyfeat_row(3, 0.97, {"AU04": 0.8, "AU15": 0.55}, "sadness"),
            pyfeat_row(5, 0.95, {"AU12": 0.49}, "neutral")]
    csv_path = write_pyfeat(tmp_path / "clip_fex.csv", rows)
    assert csv_path.read_text().startswith("frame,FaceRectX,FaceRectY,FaceRectWidth,FaceRectHeight,FaceScore,x_0,")
    out = tmp_path / "shards"
    assert make_shards(["pyfeat", "--csv", str(csv_path), "--video", str(video), "--emotions", "--out",
                        str(out)]) == 0
    meta = read_manifest(str(out))["meta"]
    assert (meta["pseudo_labels"], meta["label_tool"], meta["emotions"], meta["caption_style"]) == (
        True, "pyfeat", True, "concat")
    samples = sorted(shard_samples(out))
    assert [key for key, _, _ in samples] == ["pyfeat-clip_fex-000000", "pyfeat-clip_fex-000003",
                                              "pyfeat-clip_fex-000005"]
    labels = [s[1] for s in samples]
    assert [(x["aus"], x["emotions"]) for x in labels] == [([6, 12], ["happiness"]), ([4, 15], ["sadness"]),
                                                           ([], ["neutral"])]  # AU probability >= 0.5
    assert labels[0]["label_source"] == "pyfeat" and labels[0]["au_probability"]["12"] == 0.91
    assert labels[1]["time"] == 0.3  # frame 3 of a 10 frames/s video
    assert labels[0]["captions"] == ["It is a people who raises cheek and pulls lip corner. The face shows happiness."]
    for (_, label, image), shade in zip(samples, (0, 60, 100), strict=True):  # decoded frame F is grey 20 * F
        assert abs(np.asarray(Image.open(io.BytesIO(image))).mean() - shade) < 12, label["frame"]

    _, counts = convert("pyfeat", csv=str(csv_path), video=str(video))
    assert counts["dropped"] == {"no face found": 1, "FaceScore below 0.5": 1, "another face in the frame": 1}


def test_pyfeat_threshold_and_ffmpeg_numbered_frames(tmp_path):
    for i in range(1, 4):  # ffmpeg -i clip.mp4 frames/frame_%06d.jpg counts from 1; py-feat's frame from 0
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / f"frame_{i:06d}.jpg", quality=95)
    rows = [pyfeat_row(f, 0.9, {"AU12": 0.6, "AU25": 0.85}) for f in range(3)]
    csv_path = write_pyfeat(tmp_path / "clip.csv", rows)
    recs, _ = convert("pyfeat", csv=str(csv_path), frames=str(tmp_path))
    assert [r["labels"]["aus"] for r in recs] == [[12, 25]] * 3 and recs[0]["labels"]["emotions"] is None
    assert recs[0]["image"] == (tmp_path / "frame_000001.jpg").read_bytes()  # frame 0 is the first image
    recs, _ = convert("pyfeat", csv=str(csv_path), frames=str(tmp_path), au_threshold=0.8)
    assert [r["labels"]["aus"] for r in recs] == [[25]] * 3


# ---------------------------------------------------------------- sampling


def test_fps_sampling_keeps_the_first_usable_frame_of_each_interval(tmp_path):
    # 10 frames/s; --fps 2 takes t = 0.0, 0.5, 1.0, ...; frame 6 (t = 0.5) failed, so frame 7 (t = 0.6) stands in
    lines = [openface_line(f, (f - 1) / 10, 0.0 if f == 6 else 0.95, 0 if f == 6 else 1, {"AU12"})
             for f in range(1, 13)]
    csv_path, aligned = write_openface(tmp_path, lines)
    recs, counts = convert("openface", csv=str(csv_path), frames=str(aligned), fps=2.0)
    assert frames_of(recs) == [1, 7, 11]
    assert counts["dropped"]["not sampled (--fps / --sample)"] == 8

    rows = [pyfeat_row(f, 0.9) for f in range(0, 12)]  # py-feat has no time: frame / the video's frame rate
    pyfeat_csv = write_pyfeat(tmp_path / "fex.csv", rows)
    with pytest.raises(ValueError, match=r"pyfeat: --fps needs the video's frame rate.*--video-fps R"):
        convert("pyfeat", csv=str(pyfeat_csv), frames=str(aligned), fps=2.0)
    for f in range(12):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{f:04d}.png")  # numbered from 0, as py-feat counts
    recs, _ = convert("pyfeat", csv=str(pyfeat_csv), frames=str(tmp_path), fps=2.0, video_fps=10.0)
    assert frames_of(recs) == [0, 5, 10]


def test_label_change_sampling_alone_and_with_fps(tmp_path):
    aus = [{"AU12"}, {"AU12"}, {"AU12"}, {"AU06", "AU12"}, {"AU06", "AU12"}, set(), set(), set()]
    lines = [openface_line(f, (f - 1) / 10, 0.95, 1, present) for f, present in enumerate(aus, 1)]
    csv_path, aligned = write_openface(tmp_path, lines)
    recs, _ = convert("openface", csv=str(csv_path), frames=str(aligned), sample="label-change")
    assert frames_of(recs) == [1, 4, 6]  # the first frame, then each change
    recs, _ = convert("openface", csv=str(csv_path), frames=str(aligned), sample="label-change", fps=2.5)
    assert frames_of(recs) == [1, 4, 5, 6]  # plus the 0.4 s grid: t = 0.0, 0.4


def test_check_counts_the_tools_failed_frames(tmp_path, capsys):
    lines = [openface_line(1, 0.0, 0.98, 1, {"AU12"}), openface_line(2, 0.033, 0.1, 0)]
    csv_path, aligned = write_openface(tmp_path, lines)
    assert make_shards(["openface", "--csv", str(csv_path), "--frames", str(aligned), "--check"]) == 0
    out = capsys.readouterr().out
    assert "1 usable of 2 rows read" in out and "face not tracked (success 0) (left out by rule): 1" in out
    assert '"label_source": "openface"' in out


# ---------------------------------------------------------------- evaluation: the tool's AU set, from the manifest


@pytest.mark.parametrize("tool", ["openface", "pyfeat"])
def test_evaluation_scores_the_tools_au_set_named_by_the_manifest(tmp_path, tiny_run_dir, tool):
    """Frames where the tool saw every AU it writes are labelled with exactly DATASET_AUS[tool]; evaluating their
    shards scores that set, read from the manifest, and an --aus of another set is refused naming the fix."""
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.job import EvalJob, evaluate
    from expblip.eval.provenance import resolve_aus

    if tool == "openface":
        csv_path, frames = write_openface(tmp_path, [openface_line(f, f / 30, 0.98, 1, set(OPENFACE_CLASS))
                                                     for f in (1, 2)])
    else:
        frames = tmp_path / "frames"
        frames.mkdir()
        for f in range(2):
            Image.new("RGB", (8, 8), (f * 50, 0, 0)).save(frames / f"{f:04d}.png")
        csv_path = write_pyfeat(tmp_path / "clip.csv", [pyfeat_row(f, 0.9, dict.fromkeys(PYFEAT_AUS, 0.9))
                                                        for f in range(2)])
    out = tmp_path / "shards"
    assert make_shards([tool, "--csv", str(csv_path), "--frames", str(frames), "--out", str(out)]) == 0
    assert [labels["aus"] for _, labels, _ in shard_samples(out)] == [list(DATASET_AUS[tool])] * 2

    key, why = resolve_aus("", str(out))
    assert key == tool and str(out / MANIFEST) in why
    with pytest.raises(ValueError, match=rf"--aus synthetic contradicts .*{tool}.*--aus {tool}"):
        resolve_aus("synthetic", str(out))
    result = evaluate(EvalJob(model=str(tiny_run_dir), shards=str(out), beams=1, max_new_tokens=3, progress=False,
                              caption_metrics=False))
    assert result["settings"]["aus"] == list(DATASET_AUS[tool]) and result["settings"]["aus_set"] == tool
    assert sorted(result["model"]["per_au_f1"]) == sorted(DATASET_AUS[tool])


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


@pytest.mark.parametrize("case, expected", [
    ("no_success", r"error: openface: \S+clip.csv: no column 'success'; its columns are \[frame, face_id, timestamp, "
                   r"confidence, gaze_0_x, .*\(713 columns\)\. Expected OpenFace 2\.0 .*wiki/Output-Format\)$"),
    ("empty", r"error: openface: CSV \S+clip.csv is empty: expected OpenFace 2.0 FeatureExtraction's CSV"),
    ("no_frames", r"error: openface: frame folder \S+gone is not a directory; expected OpenFace's <video>_aligned"),
    ("no_csv", r"error: openface: CSV \S+missing.csv does not exist; pass --csv"),
    ("pyfeat_no_score", r"error: pyfeat: \S+clip.csv: no column 'FaceScore'; its columns are \[frame, FaceRectX, "),
])
def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys, case, expected):
    csv_path, aligned = write_openface(tmp_path, [openface_line(1, 0.0, 0.98, 1, {"AU12"})])
    source, frames = "openface", str(aligned)
    if case == "no_success":
        header = openface_header()
        header.remove("success")
        cells = openface_line(1, 0.0, 0.98, 1).split(", ")
        csv_path.write_text(", ".join(header) + "\n" + ", ".join(cells[:4] + cells[5:]))
    elif case == "empty":
        csv_path.write_text("")
    elif case == "no_frames":
        frames = str(tmp_path / "gone")
    elif case == "no_csv":
        csv_path = tmp_path / "missing.csv"
    elif case == "pyfeat_no_score":
        source = "pyfeat"
        text = write_pyfeat(csv_path, [pyfeat_row(0, 0.9)]).read_text()
        csv_path.write_text(text.replace(",FaceScore,", ",Score,", 1))
    out = tmp_path / "out"
    assert make_shards([source, "--csv", str(csv_path), "--frames", frames, "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(expected, errors[0]), errors
    assert not (out / MANIFEST).exists()


def test_options_that_do_not_fit_are_refused(tmp_path, capsys):
    csv_path, aligned = write_openface(tmp_path, [openface_line(1, 0.0, 0.98, 1, {"AU12"})])
    video = tmp_path / "clip.mp4"
    for source, argv, message in (
        ("openface", ["--frames", str(aligned), "--video", str(video)], "openface: pass one of --video FILE"),
        ("pyfeat", [], "pyfeat: pass one of --video FILE"),  # OpenFace alone has a default: <csv name>_aligned
        ("openface", ["--frames", str(aligned), "--emotions"], "--emotions and --video-fps apply to pyfeat only"),
        ("table", ["--table", str(csv_path), "--fps", "2"], "apply only to the sources ('openface', 'pyfeat')"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            make_shards([source, "--csv", str(csv_path), *argv, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
