"""A conversion as ``launch/make_shards.py`` asks for it: one source → WebDataset shards + manifest, judged.

    request = ConvertRequest("bp4d", out="shards/bp4d/fold1/test", root="data/BP4D", split="test", fold=1, folds=3,
                             subsample=False)
    manifest = convert(request)      # raises ConversionError when nothing, or too much, was skipped

A conversion that keeps no record, or skips more than ``max_skipped`` of its rows as bad data (missing images, ...),
raises :class:`~expblip.data.sources._common.ConversionError` naming the first skipped rows; no ``manifest.json``
is written and the partial manifest is removed, so a fixed re-run starts afresh (the same for a video folder whose
frame numbering cannot be told, re-run with ``frame_base``). Rows a documented label rule
leaves out (a BP4D AU coded 9, AffectNet codes 8-10) never count against the threshold.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from expblip.data.captions import CaptionConfig
from expblip.data.sources import SOURCES, default_caption_style, records
from expblip.data.sources._common import MAX_SKIPPED, ConversionError, DeferredImage, image_in_test
from expblip.data.sources._video import FrameNumberingError
from expblip.data.sources.facetools import TOOL_SOURCES, ToolOptions, check_request, manifest_fields
from expblip.data.sources.folds import paper_test_subjects
from expblip.data.sources.hf import check_request as check_hf
from expblip.data.sources.llava import LlavaOptions
from expblip.data.sources.llava import check_request as check_llava
from expblip.data.sources.table import TableOptions

log = logging.getLogger(__name__)

VIDEO_SOURCES = ("bp4d", "disfa", "gft")
CaptionStyle = Literal["auto", "au", "emotion", "concat"]


@dataclass
class ConvertRequest:
    """What to convert and how; the fields are make_shards' options (docs/datasets.md)."""

    source: str  # a key of expblip.data.sources.SOURCES
    out: str  # output directory or URL (file://, s3://)
    root: str = ""  # dataset root (real datasets)
    split: Literal["train", "val", "test", "all"] = "train"  # val: drawn (synthetic) or carved with val_fraction
    caption_style: CaptionStyle = "auto"  # auto: au for AU datasets, emotion for emotion datasets
    samples: int = 1000  # synthetic: number of faces
    seed: int = 0  # synthetic: the faces drawn
    image_size: int = 64  # synthetic: image side in pixels
    subsample: bool | None = None  # video datasets: every 10th frame plus label changes (None: train and all only)
    test_fraction: float | None = None  # datasets without an official split (None: the dataset's default)
    split_seed: int = 0  # seed of the subject/image split rule and of non-published folds
    # real datasets: the share of the training part's subjects (images, where there are none) that form the
    # validation split; --split val writes them, --split train leaves them out (carve_validation)
    val_fraction: float = 0.0
    test_subjects: str | None = None  # video datasets: comma-separated ids or a file with one per line
    fold: int | None = None  # video datasets: the fold whose subjects are the test split (1..folds)
    folds: int | None = None  # with fold: the number of folds (3 = the field's published lists for BP4D/DISFA)
    paper_split: bool = False  # the paper's test subjects, where they can be reconstructed (BP4D)
    frame_base: int | None = None  # video datasets: 1 or 0 forces the image numbering; None detects it
    max_skipped: float = MAX_SKIPPED  # the fraction of bad rows beyond which the conversion fails
    samples_per_shard: int = 1000
    resize: int = 0  # > 0: images written with their short side at most this many pixels (JPEG stays JPEG, q 95)
    workers: int = 1  # processes reading, checking, resizing and encoding images; the same shards as one (parallel.py)
    ray: str = ""  # a Ray cluster's address: its tasks read, check, resize and encode instead (parallel.ray_encoder)
    progress: bool = True
    table_options: TableOptions | None = None  # the table source: the table and its columns (--table, ...)
    tool_options: ToolOptions | None = None  # openface / pyfeat: the CSV, the video or frames (--csv, ...)
    llava_options: LlavaOptions | None = None  # llava: the LLaVA / ShareGPT file, --multi-turn (--json, ...)
    hf_dataset: str = ""  # hf: a save_to_disk folder, an imagefolder or parquet files (--dataset; columns: table_options)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {sorted(SOURCES)}")
        video_only = {"--fold/--folds": self.fold is not None or self.folds is not None,
                      "--test-subjects": self.test_subjects is not None, "--paper-split": self.paper_split,
                      "--frame-base": self.frame_base is not None}
        misplaced = [name for name, given in video_only.items() if given and self.source not in VIDEO_SOURCES]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} apply only to the video datasets {VIDEO_SOURCES}, "
                             f"not {self.source!r}")
        if sum([self.fold is not None or self.folds is not None, self.test_subjects is not None,
                self.paper_split]) > 1:
            raise ValueError("choose one of --fold/--folds, --test-subjects and --paper-split")
        if (self.fold is None) != (self.folds is None):
            raise ValueError("--fold and --folds go together, e.g. --fold 1 --folds 3")
        if self.folds is not None and (self.folds < 2 or not 1 <= self.fold <= self.folds):
            raise ValueError(f"--fold must be in 1..--folds and --folds >= 2, got --fold {self.fold} "
                             f"--folds {self.folds}")
        if self.frame_base not in (None, 0, 1):
            raise ValueError(f"--frame-base must be 0 or 1 (or auto), got {self.frame_base}")
        if self.resize < 0:
            raise ValueError(f"--resize must be >= 0 (0 keeps the images as they are), got {self.resize}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1 (1: this process alone), got {self.workers}")
        if self.ray and self.workers > 1:
            raise ValueError("choose --ray ADDRESS (the cluster's CPUs encode) or --workers N (this machine's), not both")
        if not 0.0 <= self.max_skipped < 1.0:
            raise ValueError(f"--max-skipped must be in [0, 1), got {self.max_skipped}")
        self._check_table()
        check_request(self.source, self.tool_options)
        self._check_validation()
        if self.subsample is None:  # a test split keeps every frame: the paper's and the protocol's test sets do
            self.subsample = self.split != "test"

    def _check_validation(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.source == "synthetic":
            if self.val_fraction:
                raise ValueError("--val-fraction carves validation out of a dataset's training part; the synthetic "
                                 "world draws its own validation faces (--split val)")
        elif self.split == "val" and not self.val_fraction:
            raise ValueError(f"--split val carves validation subjects out of {self.source}'s training part: give "
                             "--val-fraction F (e.g. 0.15), and convert --split train with the same --val-fraction "
                             "and --split-seed so the two are subject-exclusive")
        elif self.val_fraction and self.split not in ("train", "val"):
            raise ValueError(f"--val-fraction applies to --split train and --split val, not --split {self.split}")

    def _check_table(self) -> None:
        check_llava(self.source, self.llava_options)
        check_hf(self.source, self.hf_dataset)
        if self.source == "hf":
            return  # its columns are the table source's options
        if self.source != "table":
            if self.table_options is not None:
                raise ValueError(f"--table and its column options apply only to the table source, not {self.source!r}")
            return
        if self.table_options is None or not self.table_options.table:
            raise ValueError("the table source needs --table FILE (a CSV, TSV, XLSX, JSONL or parquet label table; "
                             "docs/datasets.md, 'Your own table')")

    @property
    def style(self) -> str:
        return default_caption_style(self.source) if self.caption_style == "auto" else self.caption_style


def in_validation(record: dict, fraction: float, seed: int) -> bool:
    """Whether a training-part record belongs to the carved validation split: its subject (else its image, so the
    exchanges of one instruction record stay together; else its key) ranked by sha256(f"{seed}:val:{subject}") below
    ``fraction``. Subject-exclusive, seeded, the same in the train and val conversions, and independent of the test
    split's own rule (another name is hashed)."""
    labels = record["labels"]
    subject = labels.get("subject") or labels.get("image") or record["key"]
    return image_in_test(f"val:{subject}", fraction, seed)


def carve_validation(source: Iterator[dict], req: ConvertRequest) -> Iterator[dict]:
    """The records of ``req.split`` (train or val) out of the source's training part (carved by in_validation)."""
    from expblip.data.sources.parallel import check_only

    want = req.split == "val"
    for record in source:
        if in_validation(record, req.val_fraction, req.split_seed) == want:
            yield record
        elif isinstance(record.get("image"), DeferredImage):  # --workers: its image is still read, its skip counted
            yield check_only(record)


def source_records(req: ConvertRequest, **extra) -> Iterator[dict]:
    """The records the request converts: the source's, with a carved validation split applied."""
    opts = {**source_options(req), "split": "train" if req.val_fraction else req.split}
    source = records(req.source, caption=CaptionConfig(style=req.style), **extra, **opts)
    return carve_validation(source, req) if req.val_fraction else source


def source_options(req: ConvertRequest) -> dict:
    """The keyword arguments of the source's ``records`` (without the caption config)."""
    if req.val_fraction:  # validation is carved out of the training part
        return {**source_options(dataclasses.replace(req, split="train", val_fraction=0.0)), "split": req.split}
    if req.source == "synthetic":
        return {"split": req.split, "samples": req.samples, "seed": req.seed, "image_size": req.image_size}
    if req.source in TOOL_SOURCES:
        return {"split": req.split, "root": req.root, **asdict(req.tool_options)}
    if req.source in ("llava", "hf"):
        given = asdict(req.llava_options) if req.source == "llava" else {
            "dataset": req.hf_dataset, **asdict(req.table_options or TableOptions(name="hf"))}
        opts = {"split": req.split, "root": req.root, "split_seed": req.split_seed, **given}
        return opts if req.test_fraction is None else {**opts, "test_fraction": req.test_fraction}
    if req.source == "table":
        opts = {"split": req.split, "root": req.root, "split_seed": req.split_seed, **asdict(req.table_options)}
        return opts if req.test_fraction is None else {**opts, "test_fraction": req.test_fraction}
    opts: dict = {"split": req.split, "root": req.root, "subsample": req.subsample, "split_seed": req.split_seed}
    if req.test_fraction is not None:
        opts["test_fraction"] = req.test_fraction
    if req.paper_split:
        opts["test_subjects"] = ",".join(paper_test_subjects(req.source))
    elif req.test_subjects is not None:
        opts["test_subjects"] = req.test_subjects
    if req.fold is not None:
        opts.update(fold=req.fold, folds=req.folds)
    if req.source in VIDEO_SOURCES:
        opts["frame_base"] = req.frame_base
    return opts


def manifest_meta(req: ConvertRequest, opts: dict) -> dict:
    """What the manifest records about the conversion (compared on resume: the same request resumes)."""
    meta = {"source": req.source, **{k: v for k, v in opts.items() if v is not None}, "caption_style": req.style}
    if req.val_fraction:
        meta["validation"] = {"fraction": req.val_fraction, "seed": req.split_seed, "unit": "subject, else image, else key",
                              "rule": 'sha256(f"{seed}:val:{subject}") < fraction, within the training part'}
    if req.paper_split:
        meta["paper_split"] = True
    meta.update(manifest_fields(req.source))  # pseudo-labels say so
    return meta


def _discard_partial(out: str) -> None:
    """Remove the partial manifest of a failed conversion: nothing there counts, a re-run starts afresh."""
    from expblip.data.shards import PARTIAL_MANIFEST, join_url, url_to_fs

    fs, path = url_to_fs(join_url(out, PARTIAL_MANIFEST))
    if fs.exists(path):
        fs.rm(path)


def convert(req: ConvertRequest) -> dict:
    """Write the shards and the manifest; returns the manifest. ConversionError (no manifest.json) when the source
    keeps no record or skips more than ``req.max_skipped`` of its rows."""
    from expblip.data.shards import write_shards
    from expblip.data.sources.parallel import parallel_encoder, ray_encoder

    opts = source_options(req)
    meta = manifest_meta(req, opts)
    encoding = ray_encoder(req.ray, req.resize) if req.ray else parallel_encoder(req.workers, req.resize)
    with encoding as encoder:  # None for one process; the source is made inside
        source = source_records(req, max_skipped=req.max_skipped)
        try:
            return write_shards(source, req.out, samples_per_shard=req.samples_per_shard, meta=meta,
                                progress=req.progress, resize=req.resize, encoder=encoder)
        except (ConversionError, FrameNumberingError):  # refused, not interrupted: the re-run (e.g. --frame-base)
            _discard_partial(req.out)                   # must not be told that it differs from these shards
            raise


def summary_line(manifest: dict, out: str) -> str:
    return f"[expblip] {manifest['total_samples']} samples in {len(manifest['shards'])} shards at {out}"
