"""Videos → per-frame descriptions and an AU-activation timeline (the describe CLI, the HTTP app, the page).

    frames = sample_frames("clip.mp4", fps=2)                 # [Frame(index, time, image)], decoded with PyAV
    rows = describe_frames(captioner, frames, crop_face=True) # [{"frame", "time", "caption", "aus", "emotions", ...}]
    paths = write_outputs(rows, "clip-expblip/")              # frames.json, frames.csv, timeline.png

Frames are taken at ``fps`` (the first decoded frame at or after each multiple of 1/fps), turned upright by the
stream's display matrix (phones store portrait clips sideways), each optionally cut to its largest face, and
captioned in batches. Decoding is FFmpeg's, through PyAV; only MP4/MOV, Matroska/WebM and AVI
containers are opened, recognised from their first bytes, so FFmpeg's playlist and concat demuxers (which read other
files and URLs) are never reached. Limits (``VideoLimits``) refuse a clip before decoding when its header says it is
too long, too large or would give too many frames, and stop decoding when the stream says otherwise.

The timeline is a matplotlib figure drawn with the object API on the Agg canvas (no pyplot, no display). Nothing
here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from PIL import Image

from expblip.data.facs import AUS, EMOTIONS
from expblip.infer.parse import parse_caption

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
VideoErrorKind = Literal["not_video", "too_large", "corrupt"]
EMOTION_COLORS = {"neutral": "#9e9e9e", "happiness": "#f9a825", "sadness": "#1565c0", "surprise": "#6a1b9a",
                  "fear": "#00838f", "disgust": "#6d4c41", "anger": "#c62828", "contempt": "#ad1457"}


class VideoError(ValueError):
    """A clip that is not a readable video or exceeds a limit; the message names it and says what to change."""

    def __init__(self, name: str | Path, reason: str, kind: VideoErrorKind = "not_video"):
        super().__init__(f"{name}: {reason}")
        self.kind = kind


@dataclass(frozen=True)
class VideoLimits:
    """What a clip may hold before it is refused."""

    max_frames: int = 240  # sampled frames (duration x fps): 2 minutes at 2 frames/s
    max_seconds: float = 600.0  # duration
    max_pixels: int = 3840 * 2160  # width x height of one frame (4K)


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its position among the sampled frames, its RGB image, and the seconds it stands for (from
    its own time to the next sampled frame's, or to the end of the last decoded frame)."""

    index: int
    time: float
    end: float
    image: Image.Image


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def container_format(head: bytes) -> str | None:
    """FFmpeg's demuxer for the first bytes of a file: 'mp4' (MP4/MOV/M4V), 'matroska' (MKV/WebM), 'avi'; or None."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _open(source: str | Path | IO[bytes], name: str):
    import av

    stream = open(source, "rb") if isinstance(source, (str, Path)) else source  # noqa: SIM115 - closed by caller
    head = stream.read(16)
    stream.seek(0)
    fmt = container_format(head)
    if fmt is None:
        raise VideoError(name, "not an MP4/MOV, MKV/WebM or AVI video (unrecognised first bytes)", "not_video")
    try:
        return av.open(stream, format=fmt, mode="r"), stream
    except (av.error.FFmpegError, ValueError) as err:
        raise VideoError(name, f"cannot open the video ({err})", "corrupt") from err


def sample_frames(source: str | Path | IO[bytes], fps: float = 2.0, limits: VideoLimits = VideoLimits(),
                  name: str | None = None) -> list[Frame]:
    """Frames of the first video stream at ``fps`` frames per second of video time; VideoError naming the clip."""
    import av

    if fps <= 0:
        raise ValueError(f"fps must be > 0 (frames sampled per second of video), got {fps}")
    label = name or str(source)
    container, handle = _open(source, label)
    try:
        with container:
            if not container.streams.video:
                raise VideoError(label, "holds no video stream", "not_video")
            stream = container.streams.video[0]
            _check_header(stream, container, fps, limits, label)
            return _decode(container, stream, fps, limits, label)
    except av.error.FFmpegError as err:
        raise VideoError(label, f"cannot decode the video ({err})", "corrupt") from err
    finally:
        if isinstance(source, (str, Path)):
            handle.close()


def _duration(stream, container) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _check_header(stream, container, fps: float, limits: VideoLimits, label: str) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise VideoError(label, f"frames of {width}x{height} are above the {limits.max_pixels}-pixel limit; "
                                "downscale the video first", "too_large")
    duration = _duration(stream, container)
    if duration is None:
        return  # checked while decoding
    if duration > limits.max_seconds:
        raise VideoError(label, f"{duration:.1f} s is longer than the {limits.max_seconds:g} s limit; cut the clip",
                         "too_large")
    expected = int(duration * fps) + 1
    if expected > limits.max_frames:
        raise VideoError(label, f"{duration:.1f} s at {fps:g} frames/s gives {expected} frames, above the "
                                f"{limits.max_frames}-frame limit; lower fps to {limits.max_frames / duration:.2f} or "
                                "cut the clip", "too_large")


def _decode(container, stream, fps: float, limits: VideoLimits, label: str) -> list[Frame]:
    """The first frame at or after each sample time k / fps (times relative to the stream's start)."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    period = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps  # a frame's own duration
    taken: list[tuple[float, Image.Image]] = []
    next_time, clip_end = 0.0, 0.0
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        t = max(0.0, frame.time - start)
        if t > limits.max_seconds:
            raise VideoError(label, f"runs past the {limits.max_seconds:g} s limit; cut the clip", "too_large")
        clip_end = max(clip_end, t + (float(frame.duration * frame.time_base) if frame.duration else period))
        if t + 1e-6 < next_time:
            continue
        if len(taken) == limits.max_frames:
            raise VideoError(label, f"gives more than {limits.max_frames} frames at {fps:g} frames/s; lower fps",
                             "too_large")
        taken.append((t, upright(frame)))
        while next_time <= t + 1e-6:
            next_time += 1.0 / fps
    if not taken:
        raise VideoError(label, "holds no decodable frame", "corrupt")
    ends = [t for t, _ in taken[1:]] + [clip_end]
    return [Frame(i, round(t, 4), round(end, 4), image) for i, ((t, image), end) in enumerate(zip(taken, ends, strict=True))]


_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def upright(frame) -> Image.Image:
    """The frame as a player shows it: turned by its display matrix (a phone's portrait clip is stored sideways).

    PyAV's ``frame.rotation`` is the counter-clockwise angle of the stream's display matrix, FFmpeg's autorotate
    angle; a quarter turn is exact (a transpose), any other angle is resampled bicubically with the canvas grown. A
    mirror in the matrix (rare: front cameras set it on some devices) is not applied."""
    image = frame.to_image().convert("RGB")
    angle = round(frame.rotation or 0) % 360
    if angle in _TURNS:
        return image.transpose(_TURNS[angle])
    return image.rotate(angle, Image.Resampling.BICUBIC, expand=True) if angle else image


# ---------------------------------------------------------------- frames → descriptions


def crop_frames(frames: Sequence[Frame], crop_face: bool) -> tuple[list[Image.Image], list[dict | None]]:
    """(the images the model sees, the face box per frame or None) — each frame cut to its largest face if asked."""
    if not crop_face:
        return [f.image for f in frames], [None] * len(frames)
    from expblip.infer.face import crop_face as crop

    crops = [crop(f.image) for f in frames]
    return [c.image for c in crops], [c.face.as_dict() if c.face else None for c in crops]


def frame_rows(frames: Sequence[Frame], captions: Sequence[str], faces: Sequence[dict | None] | None = None) -> list[dict]:
    """One row per frame: {"frame", "time", "end", "caption", "aus", "emotions"} (+ "face" when faces are given)."""
    rows = []
    for i, (frame, caption) in enumerate(zip(frames, captions, strict=True)):
        row = {"frame": frame.index, "time": frame.time, "end": frame.end, "caption": caption,
               **parse_caption(caption)}
        if faces is not None:
            row["face"] = faces[i]
        rows.append(row)
    return rows


def describe_frames(captioner, frames: Sequence[Frame], crop_face: bool = False, gen=None,
                    batch_size: int = 16, prompt: str = "") -> list[dict]:
    """Caption sampled frames with a Captioner, ``batch_size`` at a time (``prompt``: a task instruction); rows as
    ``frame_rows``."""
    images, faces = crop_frames(frames, crop_face)
    captions = captioner.caption(images, gen, batch_size, prompt)
    return frame_rows(frames, captions, faces if crop_face else None)


def activation_spans(rows: Sequence[dict], key: str = "aus") -> dict:
    """{AU (or emotion): [[start, end], ...]} in seconds: a frame's label holds over its [time, end). Adjacent
    frames with the label merge into one span."""
    spans: dict = {}
    for row in rows:
        start, end = row["time"], row["end"]
        for label in row[key]:
            runs = spans.setdefault(label, [])
            if runs and abs(runs[-1][1] - start) < 1e-6:
                runs[-1][1] = round(end, 4)
            else:
                runs.append([round(start, 4), round(end, 4)])
    return dict(sorted(spans.items(), key=lambda kv: (EMOTIONS.index(kv[0]) if kv[0] in EMOTIONS else kv[0])))


def video_summary(rows: Sequence[dict]) -> dict:
    """The JSON the CLI writes and the HTTP app answers: frames plus the AU and emotion spans."""
    return {"frames": list(rows), "timeline": {"aus": {str(k): v for k, v in activation_spans(rows).items()},
                                               "emotions": activation_spans(rows, "emotions")}}


# ---------------------------------------------------------------- files out


def csv_text(rows: Sequence[dict]) -> str:
    """frame, time, end, caption, aus, emotions, then one 0/1 column per AU seen in any frame (AU1, AU2, ...)."""
    aus = sorted({au for r in rows for au in r["aus"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["frame", "time", "end", "caption", "aus", "emotions", *(f"AU{au}" for au in aus)])
    for r in rows:
        writer.writerow([r["frame"], f"{r['time']:.3f}", f"{r['end']:.3f}", r["caption"], " ".join(map(str, r["aus"])),
                         " ".join(r["emotions"]), *(int(au in r["aus"]) for au in aus)])
    return out.getvalue()


def timeline_png(rows: Sequence[dict], title: str = "") -> bytes:
    """The AU-activation timeline: one row per AU seen (FACS name beside it), bars where the caption names it, and
    the emotion named by each frame along the top. PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    au_spans, emotion_spans = activation_spans(rows), activation_spans(rows, "emotions")
    labels = [f"AU{au} {AUS[au].name}" if au in AUS else f"AU{au}" for au in au_spans]
    end = max([s[1] for runs in [*au_spans.values(), *emotion_spans.values()] for s in runs],
              default=rows[-1]["end"] if rows else 1.0)
    fig = Figure(figsize=(9, 1.6 + 0.32 * (len(labels) + 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row, runs in enumerate(au_spans.values(), start=1):  # row 0 is the emotion strip
        ax.broken_barh([(s, e - s) for s, e in runs], (row - 0.35, 0.7), color="#2e7d32")
    for emotion, runs in emotion_spans.items():
        ax.broken_barh([(s, e - s) for s, e in runs], (-0.35, 0.7), color=EMOTION_COLORS.get(emotion, "#777777"),
                       alpha=0.8, label=emotion)
    ax.set_yticks(range(len(labels) + 1), ["emotion", *labels])
    ax.set_ylim(len(labels) + 0.7, -0.7)  # top to bottom: emotion, then AUs in ascending order
    ax.set_xlim(0, end)
    ax.set_xlabel("time (s)")
    ax.grid(axis="x", alpha=0.3)
    if emotion_spans:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    if not labels:
        ax.text(end / 2, 1, "no AU named in any frame", ha="center", va="center", color="grey")
    ax.set_title(title or f"AU activation over {len(rows)} frames")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_outputs(rows: Sequence[dict], out: str | Path, title: str = "") -> dict[str, Path]:
    """frames.json (video_summary), frames.csv (csv_text) and timeline.png (timeline_png) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "frames.json", "csv": out / "frames.csv", "timeline": out / "timeline.png"}
    paths["json"].write_text(json.dumps(video_summary(rows), indent=1, ensure_ascii=False))
    paths["csv"].write_text(csv_text(rows))
    paths["timeline"].write_bytes(timeline_png(rows, title))
    return paths


def describe_video_file(captioner, path: str | Path, fps: float = 2.0, crop_face: bool = False, gen=None,
                        batch_size: int = 16, limits: VideoLimits = VideoLimits(),
                        progress: Callable[[str], None] | None = None, prompt: str = "") -> list[dict]:
    """Decode, sample, crop and caption one clip (the describe CLI); rows as ``frame_rows``."""
    frames = sample_frames(path, fps, limits)
    if progress:
        progress(f"{path}: {len(frames)} frames at {fps:g} frames/s")
    return describe_frames(captioner, frames, crop_face, gen, batch_size, prompt)
