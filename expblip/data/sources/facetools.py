"""Videos run through OpenFace 2.0 or py-feat → records whose AUs (and emotions) are the tool's pseudo-labels.

    python launch/make_shards.py openface --csv processed/clip.csv --frames processed/clip_aligned --out shards/clip
    python launch/make_shards.py pyfeat --csv clip_fex.csv --video clip.mp4 --fps 2 --emotions --out shards/clip

The CSV is the one the tool writes for one video, streamed row by row (expblip.data.sources._rows):

* **OpenFace 2.0** ``FeatureExtraction -aus`` (https://github.com/TadasBaltrusaitis/OpenFace/wiki/Output-Format):
  a header of ``frame, face_id, timestamp, confidence, success, ..., AU01_r, ..., AU45_r, AU01_c, ..., AU45_c``
  with a space after each comma (header and cells; read either way). ``frame`` counts from 1. An AU is present
  when its ``_c`` (occurrence) column is 1, or with ``--au-threshold T`` when its ``_r`` intensity (0-5) is >= T
  (``AU28`` has only ``_c``). ``AU45`` (blink) is not in expblip's vocabulary and is not read.
* **py-feat** ``Detector.detect_video`` / ``Fex.to_csv`` (https://py-feat.org/basic_tutorials/03_detector_vids.html;
  columns built in ``feat/detector.py``): ``FaceRectX, ..., FaceScore, x_0, ..., Pitch, Roll, Yaw, AU01, ..., AU43,
  anger, disgust, fear, happiness, sadness, surprise, neutral, ..., input, frame`` with ``frame`` counting from 0.
  AU columns hold probabilities: present when >= ``--au-threshold`` (default 0.5). ``--emotions`` labels each frame
  with its most probable emotion too.

A frame the tool marks as failed is left out and counted (never against ``--max-skipped``: a tracker losing the
face is the tool's verdict, not broken data): OpenFace ``success`` 0 or ``confidence`` below ``--min-confidence``
(default 0.8), py-feat an empty or NaN ``FaceScore`` (no face) or one below ``--min-confidence`` (default 0.5). A
frame with several faces keeps the most confident. Frames are then sampled: every usable frame by default;
``--fps F`` keeps the first usable frame at or after each multiple of 1/F seconds (OpenFace's ``timestamp``,
py-feat's ``frame`` over the video's frame rate); ``--sample label-change`` keeps the first frame and each whose
labels differ from the previous usable frame's; both together keep the union (the paper's rule for video sets).

Images come from ``--frames DIR`` (OpenFace's ``<video>_aligned/frame_det_00_000001.bmp``, or numbered files such
as ffmpeg's ``frame_000001.jpg``; a plain folder counts frames from its lowest number, 0 or 1) or are decoded from
``--video`` with PyAV (JPEG at shards.JPEG_QUALITY); OpenFace without either reads the ``<csv name>_aligned`` folder
beside its CSV, as FeatureExtraction lays them out. ``--root`` is the base of relative --csv/--video/--frames paths.
A frame without an image is skipped and counted as bad data.

Labels: ``aus``, ``emotions`` (py-feat with --emotions), ``dataset`` (--name, default the tool), ``subject`` and
``sequence`` (the CSV's name), ``frame``, ``time``, ``face_score``, ``label_source`` (the tool), plus
``au_intensity`` (OpenFace with --au-threshold) or ``au_probability`` (py-feat). The manifest says
``pseudo_labels: true`` and the tool (:func:`manifest_fields`). One video is one subject: every frame belongs to the
split asked for; convert held-out videos on their own.
"""

from __future__ import annotations

import io
import logging
import math
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from expblip.data.captions import CaptionConfig, captions_for
from expblip.data.facs import AUS
from expblip.data.sources._common import Skips, check_split, record_key
from expblip.data.sources._rows import Table, TableError, open_table
from expblip.data.sources._video import frame_number
from expblip.data.sources.table import _blank, _number, read_image

log = logging.getLogger("expblip.data.sources")

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # OpenFace writes its aligned faces as .bmp
PYFEAT_EMOTIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")  # FEAT_EMOTION_COLUMNS
_OPENFACE_AU = re.compile(r"^AU0*(\d+)_([cr])$")
_PYFEAT_AU = re.compile(r"^AU0*(\d+)$")
_OPENFACE_ALIGNED = re.compile(r"frame_det_(\d+)_(\d+)$")  # <video>_aligned/frame_det_<face>_<frame>.bmp


@dataclass(frozen=True)
class Tool:
    """What one tool's CSV looks like."""

    name: Literal["openface", "pyfeat"]
    score: str  # the column of the face detector's / tracker's confidence
    min_score: float  # default --min-confidence
    au_threshold: float | None  # default --au-threshold (None: OpenFace's _c occurrence columns)
    first_frame: int  # the CSV's number of the video's first frame
    required: tuple[str, ...]
    expected: str
    docs: str


TOOLS = {
    "openface": Tool(name="openface", score="confidence", min_score=0.8, au_threshold=None, first_frame=1,
                     required=("frame", "confidence", "success"),
                     expected="OpenFace 2.0 FeatureExtraction's CSV (run with -aus): frame, face_id, timestamp, "
                     "confidence, success, ..., AU01_r, ..., AU01_c, ...",
                     docs="https://github.com/TadasBaltrusaitis/OpenFace/wiki/Output-Format"),
    "pyfeat": Tool(name="pyfeat", score="FaceScore", min_score=0.5, au_threshold=0.5, first_frame=0,
                   required=("frame", "FaceScore"),
                   expected="py-feat's Detector output saved as CSV: FaceRectX, ..., FaceScore, ..., AU01, ..., "
                   "AU43, anger, ..., neutral, input, frame",
                   docs="https://py-feat.org/basic_tutorials/03_detector_vids.html"),
}
TOOL_SOURCES = tuple(TOOLS)


@dataclass
class ToolOptions:
    """The openface / pyfeat sources' options (make_shards --csv ...)."""

    csv: str = ""  # the tool's per-frame CSV for one video (local path or fsspec URL)
    video: str | None = None  # the video the CSV describes: frames decoded with PyAV
    frames: str | None = None  # or its frames: OpenFace's <video>_aligned folder, or numbered images
    fps: float | None = None  # keep the first usable frame at or after each multiple of 1/fps seconds
    sample: Literal["all", "label-change"] | None = None  # label-change: keep frames whose labels change
    au_threshold: float | None = None  # OpenFace: _r intensity >= T (default: _c); py-feat: probability (0.5)
    min_confidence: float | None = None  # below this the tool's frame counts as failed (OpenFace 0.8, py-feat 0.5)
    emotions: bool | None = None  # py-feat: label the most probable of its seven emotion columns
    video_fps: float | None = None  # py-feat with --frames and --fps: the frame rate its frame numbers count
    name: str | None = None  # labels["dataset"] and the keys' prefix (default: the tool)

    def check(self, tool: str) -> None:
        """ValueError naming the option and the fix."""
        if not self.csv:
            raise ValueError(f"{tool} needs --csv FILE: the per-frame CSV the tool wrote for one video "
                             f"({TOOLS[tool].docs}; docs/datasets.md, 'OpenFace and py-feat CSVs')")
        given = [o for o, v in (("--video", self.video), ("--frames", self.frames)) if v is not None]
        if len(given) == 2 or (tool == "pyfeat" and not given):
            raise ValueError(f"{tool}: pass one of --video FILE (frames decoded from it) and --frames DIR (its "
                             "frames as images)")
        for option, value in (("--fps", self.fps), ("--video-fps", self.video_fps), ("--au-threshold",
                                                                                     self.au_threshold)):
            if value is not None and value <= 0:
                raise ValueError(f"{option} must be > 0, got {value}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if tool == "openface" and (self.emotions or self.video_fps is not None):
            raise ValueError("--emotions and --video-fps apply to pyfeat only: OpenFace labels no emotion and "
                             "writes each frame's timestamp")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ValueError(f"--name must be letters, digits, _ or -, got {self.name!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ToolOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


def check_request(source: str, options: ToolOptions | None) -> None:
    """ConvertRequest's check: tool options only for a tool source, and a tool source needs them."""
    if source not in TOOLS:
        if options is not None:
            raise ValueError(f"--csv, --video, --frames, --fps, --sample, --min-confidence, --emotions and "
                             f"--video-fps apply only to the sources {TOOL_SOURCES}, not {source!r}")
        return
    (options or ToolOptions()).check(source)


def manifest_fields(source: str) -> dict:
    """What a manifest of tool-labelled shards says about its labels (a training run logs the manifest's meta)."""
    return {"pseudo_labels": True, "label_tool": source} if source in TOOLS else {}


# ---------------------------------------------------------------- columns


def _listed(columns: list[str]) -> str:
    shown = ", ".join(columns[:12])
    return f"[{shown}{', ...' if len(columns) > 12 else ''}] ({len(columns)} columns)"


def _fail(tool: Tool, path: str, problem: str, columns: list[str]) -> TableError:
    return TableError(f"{tool.name}: {path}: {problem}; its columns are {_listed(columns)}. Expected {tool.expected} "
                      f"({tool.docs})")


@dataclass
class ToolColumns:
    """Which column holds what in one tool's CSV."""

    aus: dict[int, str]  # AU → the column read for it
    time: str | None = None  # OpenFace: timestamp
    face: str | None = None  # OpenFace: face_id
    emotions: list[str] = field(default_factory=list)  # py-feat with --emotions: its seven emotion columns


def resolve(tool: Tool, table: Table, opts: ToolOptions) -> ToolColumns:
    """The CSV's columns; TableError naming the file, the missing column and what the tool writes."""
    columns = table.columns
    for name in tool.required:
        if name not in columns:
            raise _fail(tool, table.path, f"no column {name!r}", columns)
    aus = _openface_aus(tool, table, opts) if tool.name == "openface" else _pyfeat_aus(table)
    cols = ToolColumns(aus, "timestamp" if "timestamp" in columns else None,
                       "face_id" if "face_id" in columns else None)
    if opts.emotions:
        missing = [e for e in PYFEAT_EMOTIONS if e not in columns]
        if missing:
            raise _fail(tool, table.path, f"--emotions: no column {missing[0]!r} (of {', '.join(PYFEAT_EMOTIONS)})",
                        columns)
        cols.emotions = list(PYFEAT_EMOTIONS)
    if not cols.aus and not cols.emotions:
        hint = "run FeatureExtraction with -aus" if tool.name == "openface" else "pass --emotions for emotions only"
        raise _fail(tool, table.path, f"no AU column (AU01 ... AU43) expblip knows: {hint}", columns)
    if opts.fps and tool.name == "openface" and cols.time is None:
        raise _fail(tool, table.path, "--fps needs the column 'timestamp'", columns)
    return cols


def _openface_aus(tool: Tool, table: Table, opts: ToolOptions) -> dict[int, str]:
    """{AU: column}: _c (occurrence) by default, _r (intensity) with --au-threshold where the AU has one."""
    found: dict[int, dict[str, str]] = {}
    for column in table.columns:
        match = _OPENFACE_AU.match(column)
        if match and int(match.group(1)) in AUS:  # AU45 (blink) is not in expblip's vocabulary
            found.setdefault(int(match.group(1)), {})[match.group(2)] = column
    if found and opts.au_threshold is None and not any("c" in kinds for kinds in found.values()):
        raise _fail(tool, table.path, "only AU intensity (_r) columns: pass --au-threshold (e.g. 1) to read them",
                    table.columns)
    order = ("r", "c") if opts.au_threshold is not None else ("c",)
    picked = {au: next((kinds[k] for k in order if k in kinds), None) for au, kinds in sorted(found.items())}
    return {au: column for au, column in picked.items() if column}


def _pyfeat_aus(table: Table) -> dict[int, str]:
    found = {int(m.group(1)): c for c in table.columns if (m := _PYFEAT_AU.match(c))}
    return {au: c for au, c in sorted(found.items()) if au in AUS}


# ---------------------------------------------------------------- rows → frames


@dataclass
class FrameRow:
    """One face in one frame as the tool saw it."""

    where: str  # "FILE row N"
    frame: int
    face: int
    score: float  # the tool's confidence (NaN: no face)
    failed: str | None  # why the tool's frame is unusable, or None
    labels: dict  # aus, emotions, au_intensity / au_probability
    time: float | None = None  # seconds from the video's start


def _cell(row: dict, column: str | None) -> float | None:
    if column is None or _blank(row.get(column)):
        return None
    return _number(row[column])


def _frame(where: str, row: dict) -> int:
    number = _number(row.get("frame", ""))
    if number is None or not number.is_integer():
        raise TableError(f"{where}: frame {row.get('frame')!r} is not a frame number; is this the tool's CSV?")
    return int(number)


@dataclass
class FrameReader:
    """Parses one tool's rows into FrameRows (labels read only where the tool succeeded)."""

    tool: Tool
    cols: ToolColumns
    opts: ToolOptions
    rate: float | None  # frames per second of the video (py-feat's time); None: unknown

    def row(self, where: str, row: dict) -> FrameRow:
        frame, score = _frame(where, row), _cell(row, self.tool.score)
        face = int(_cell(row, self.cols.face) or 0)
        failed = self.failure(row, score)
        labels = {} if failed else self.labels(where, row)
        return FrameRow(where, frame, face, math.nan if score is None else score, failed, labels, self.time(row, frame))

    def failure(self, row: dict, score: float | None) -> str | None:
        floor = self.opts.min_confidence if self.opts.min_confidence is not None else self.tool.min_score
        if self.tool.name == "openface" and _cell(row, "success") != 1:
            return "face not tracked (success 0)"
        if score is None or math.isnan(score):
            return "no face found"
        return f"{self.tool.score} below {floor:g}" if score < floor else None

    def time(self, row: dict, frame: int) -> float | None:
        if self.cols.time is not None:
            return _cell(row, self.cols.time)
        return None if self.rate is None else (frame - self.tool.first_frame) / self.rate

    def labels(self, where: str, row: dict) -> dict:
        values = {}
        for au, column in self.cols.aus.items():
            value = _cell(row, column)
            if value is not None and math.isnan(value):
                value = None
            if value is None and not _blank(row.get(column)):
                raise TableError(f"{where}: column {column!r} = {row[column]!r} is not a number")
            if value is not None:
                values[au] = value
        labels: dict = {"aus": self.present(values) if values else None, "emotions": self.emotion(row)}
        if values and self.tool.name == "pyfeat":
            labels["au_probability"] = {str(au): round(v, 4) for au, v in values.items()}
        elif values and self.opts.au_threshold is not None:
            labels["au_intensity"] = {str(au): v for au, v in values.items() if self.cols.aus[au].endswith("_r")}
        return labels

    def present(self, values: dict[int, float]) -> list[int]:
        threshold = self.opts.au_threshold if self.opts.au_threshold is not None else self.tool.au_threshold
        floor = {au: threshold if threshold is not None and not self.cols.aus[au].endswith("_c") else 0.5
                 for au in values}  # _c occurrence cells are 0 or 1
        return sorted(au for au, v in values.items() if v >= floor[au])

    def emotion(self, row: dict) -> list[str] | None:
        """py-feat with --emotions: the most probable of its seven emotions (all in facs.EMOTIONS)."""
        scores = {name: _cell(row, name) for name in self.cols.emotions}
        known = {name: s for name, s in scores.items() if s is not None and not math.isnan(s)}
        return [max(known, key=known.__getitem__)] if known else None


def by_frame(rows: Iterable[FrameRow], skips: Skips) -> Iterator[FrameRow]:
    """One row per frame, in frame order: its most confident usable face; failed and other faces counted."""
    group: list[FrameRow] = []
    for row in rows:
        if group and row.frame != group[0].frame:
            if row.frame < group[0].frame:
                raise TableError(f"{row.where}: frame {row.frame} comes after frame {group[0].frame}; the tool writes "
                                 "frames in order: sort the CSV by frame")
            yield from _best(group, skips)
            group = []
        group.append(row)
    yield from _best(group, skips)


def _best(group: list[FrameRow], skips: Skips) -> list[FrameRow]:
    usable = [r for r in group if r.failed is None]
    for row in group:
        if row.failed is not None:
            skips.drop(row.failed, row.where)
    if not usable:
        return []
    best = max(usable, key=lambda r: r.score)
    for row in usable:
        if row is not best:
            skips.drop("another face in the frame", row.where)
    return [best]


@dataclass
class Sampler:
    """--fps and --sample label-change: which usable frames are kept (both: either rule keeps a frame)."""

    fps: float | None
    label_change: bool
    next_time: float = 0.0
    previous: tuple | None = None

    def keep(self, row: FrameRow) -> bool:
        current = (tuple(row.labels.get("aus") or ()), tuple(row.labels.get("emotions") or ()))
        changed = self.previous is None or current != self.previous
        self.previous = current
        on_grid = False
        if self.fps and row.time is not None and row.time + 1e-6 >= self.next_time:
            on_grid = True
            while self.next_time <= row.time + 1e-6:
                self.next_time += 1.0 / self.fps
        if not self.fps and not self.label_change:
            return True
        return on_grid or (self.label_change and changed)


# ---------------------------------------------------------------- images


class FolderFrames:
    """The frame images of a folder: OpenFace's frame_det_<face>_<frame> names, or any name ending in a number."""

    def __init__(self, folder: str, tool: Tool) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{tool.name}: frame folder {folder} is not a directory; expected OpenFace's "
                                    "<video>_aligned folder (frame_det_00_000001.bmp) or numbered frames "
                                    "(frame_000001.jpg), or pass --video")
        self.images = _list_frames(self.folder)
        if not self.images:
            raise FileNotFoundError(f"{tool.name}: no numbered frame image ({', '.join(FRAME_EXTENSIONS)}) in "
                                    f"{folder}; expected frame_det_00_000001.bmp or frame_000001.jpg names")
        plain = [n for face, n in self.images if face is None]
        base = min(plain) if plain and min(plain) in (0, 1) else tool.first_frame
        self.shift = base - tool.first_frame  # image number = CSV frame + shift
        if self.shift:
            log.info("%s: %s counts frames from %d, the CSV from %d: pairing image N+%d with frame N", tool.name,
                     folder, base, tool.first_frame, self.shift)

    def image(self, row: FrameRow, skips: Skips) -> bytes | Image.Image | None:
        path = self.images.get((row.face, row.frame)) or self.images.get((None, row.frame + self.shift))
        if path is None:
            skips.add("missing image", f"{row.where}: no image of frame {row.frame} in {self.folder}")
            return None
        return read_image(str(path), skips, row.where)

    def close(self) -> None:
        pass


def _list_frames(folder: Path) -> dict[tuple[int | None, int], Path]:
    """{(face or None, frame number): path}; two plain images of one number are an error."""
    images: dict[tuple[int | None, int], Path] = {}
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if path.suffix.lower() not in FRAME_EXTENSIONS:
            continue
        aligned = _OPENFACE_ALIGNED.search(path.stem)
        key = (int(aligned.group(1)), int(aligned.group(2))) if aligned else (None, frame_number(path.stem))
        if key[1] is None:
            continue
        if key in images:
            raise ValueError(f"{folder}: two images for frame {key[1]}: {images[key].name} and {path.name}")
        images[key] = path
    return images


class VideoFrames:
    """Frames decoded from the video in order with PyAV, one at a time: frame F is the (F - first_frame)-th."""

    def __init__(self, video: str, tool: Tool) -> None:
        try:
            import av
        except ImportError as err:
            raise ValueError(f"{tool.name}: --video needs PyAV (pip install av); or pass --frames DIR") from err
        if not os.path.isfile(os.path.expanduser(video)):
            raise FileNotFoundError(f"{tool.name}: video {video} does not exist; pass the video the CSV describes, "
                                    "or --frames DIR")
        self.video, self.tool, self.av = video, tool, av
        try:
            self.container = av.open(os.path.expanduser(video))
        except (av.error.FFmpegError, ValueError) as err:
            raise ValueError(f"{tool.name}: cannot open the video {video} ({err})") from err
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{tool.name}: {video} holds no video stream")
        self.stream = self.container.streams.video[0]
        self.decoded = self.container.decode(self.stream)
        self.index, self.current = -1, None

    @property
    def rate(self) -> float | None:
        return float(self.stream.average_rate) if self.stream.average_rate else None

    def image(self, row: FrameRow, skips: Skips) -> bytes | None:
        from expblip.data.shards import JPEG_QUALITY

        wanted = row.frame - self.tool.first_frame
        try:
            while self.index < wanted and self.current is not False:
                self.current = next(self.decoded, False)
                self.index += 1
        except self.av.error.FFmpegError as err:
            raise TableError(f"{self.tool.name}: cannot decode {self.video} at frame {row.frame} ({err})") from err
        if self.current is False or wanted < 0:
            skips.add("missing image", f"{row.where}: {self.video} has no frame {row.frame}")
            return None
        buffer = io.BytesIO()
        self.current.to_image().convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def close(self) -> None:
        self.container.close()


# ---------------------------------------------------------------- records


def _open_csv(tool: Tool, path: str) -> Table:
    from expblip.data.shards import url_to_fs

    fs, inner = url_to_fs(path)
    if not fs.isfile(inner):
        raise FileNotFoundError(f"{tool.name}: CSV {path} does not exist; pass --csv with the file {tool.expected}")
    with fs.open(inner, "rb") as f:
        if not f.read(4096).strip():
            raise TableError(f"{tool.name}: CSV {path} is empty: expected {tool.expected} ({tool.docs})")
    try:
        return open_table(path)
    except TableError as err:
        raise TableError(f"{tool.name}: {err}; expected {tool.expected} ({tool.docs})") from None


def _frame_rate(tool: Tool, opts: ToolOptions, images: FolderFrames | VideoFrames) -> float | None:
    rate = opts.video_fps or (images.rate if isinstance(images, VideoFrames) else None)
    if tool.name == "pyfeat" and opts.fps and rate is None:
        raise ValueError("pyfeat: --fps needs the video's frame rate (py-feat numbers frames, with no time): pass "
                         "--video, or --video-fps R with --frames")
    return rate


def _records(tool: Tool, table: Table, reader: FrameReader, images: FolderFrames | VideoFrames,
             caption: CaptionConfig, skips: Skips, limit: int | None) -> Iterator[dict]:
    name, stem = reader.opts.name or tool.name, Path(table.path).stem
    sampler, kept = Sampler(reader.opts.fps, reader.opts.sample == "label-change"), 0
    try:
        rows = (reader.row(where, row) for where, row in islice(table.rows, limit))
        for frame in by_frame(rows, skips):
            if not sampler.keep(frame):
                skips.drop("not sampled (--fps / --sample)", frame.where)
                continue
            labels = {"aus": None, "emotions": None, **frame.labels, "dataset": name, "subject": stem,
                      "sequence": stem, "frame": frame.frame, "time": None if frame.time is None else
                      round(frame.time, 3), "face_score": frame.score, "label_source": tool.name}
            if labels["aus"] is None and labels["emotions"] is None:
                skips.add("no label", frame.where)
                continue
            image = images.image(frame, skips)
            if image is None:
                continue
            kept += 1
            yield {"key": record_key(name, stem, f"{frame.frame:06d}"), "image": image, "labels": labels,
                   "captions": captions_for(labels, caption)}
    finally:
        images.close()
    skips.finish(kept)


def locate(tool: Tool, opts: ToolOptions, root: str) -> ToolOptions:
    """``opts`` with --csv, --video and --frames relative to ``root`` (when given) and OpenFace's frames defaulting to
    the ``<csv name>_aligned`` folder beside the CSV (FeatureExtraction's layout); FileNotFoundError for no CSV or a
    missing root."""
    if root and "://" not in root and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"{tool.name}: root {root} is not a directory; expected the folder of the tool's "
                                "output (--csv, --video and --frames are relative to --root)")
    if not opts.csv:
        under = f" under {root}" if root else ""
        raise FileNotFoundError(f"{tool.name}: no CSV given (--csv FILE, relative to --root){under}; expected "
                                f"{tool.expected} ({tool.docs})")

    def place(path: str | None) -> str | None:
        inside = path and root and "://" not in path and not os.path.isabs(os.path.expanduser(path))
        return posixpath.join(root, path) if inside else path

    frames = place(opts.frames)
    if tool.name == "openface" and opts.video is None and frames is None:
        csv = place(opts.csv) or ""
        frames = posixpath.join(posixpath.dirname(csv), f"{posixpath.splitext(posixpath.basename(csv))[0]}_aligned")
    return replace(opts, csv=place(opts.csv), video=place(opts.video), frames=frames)


def records(source: str, root: str = "", split: str = "train", caption: CaptionConfig | None = None, *,
            max_skipped: float | None = None, limit: int | None = None, **options: Any) -> Iterator[dict]:
    """The frames of one tool CSV as records (``options``: ToolOptions' fields; ``limit``: CSV rows read; ``root``:
    the base of relative paths). The CSV's header, the frame folder or the video are checked now: a bad one raises
    before anything is written."""
    check_split(split, source)
    tool = TOOLS[source]
    opts = locate(tool, ToolOptions.from_options(options), root)
    opts.check(source)
    table = _open_csv(tool, opts.csv)
    cols = resolve(tool, table, opts)
    images = VideoFrames(opts.video, tool) if opts.video else FolderFrames(opts.frames or "", tool)
    try:
        reader = FrameReader(tool, cols, opts, _frame_rate(tool, opts, images))
    except ValueError:
        images.close()
        raise
    style = caption or CaptionConfig("au" if source == "openface" else "concat")
    return _records(tool, table, reader, images, style, Skips(opts.name or source, max_skipped), limit)


def openface_records(**options: Any) -> Iterator[dict]:
    """OpenFace 2.0 FeatureExtraction's CSV + the video or its frames (see the module docstring)."""
    return records("openface", **options)


def pyfeat_records(**options: Any) -> Iterator[dict]:
    """py-feat's detector CSV + the video or its frames (see the module docstring)."""
    return records("pyfeat", **options)
