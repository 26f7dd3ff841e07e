"""Shards → training batches: deterministic, resumable mid-epoch, and tolerant of bad data.

The stages each data worker runs (open_clip's WebDataset pipeline, with exact positions for resuming):

    plan_worker_shards(epoch)   shard order shuffled by (seed, epoch) → shards[rank::world] (+ padding) → [w::workers]
    read_shards                 open (3 tries, back-off on transient errors) → tar members → samples grouped by key
    shuffle                     sample buffer seeded by (seed, epoch, rank, worker)
    number                      samples counted 0, 1, 2, … within (worker, epoch); a resumed loader skips here,
                                before decoding, the samples its cursor says were already consumed
    decode                      JSON labels, caption, image (size checked from the header first); bad data is
                                skipped and counted by kind, and too much of it raises StreamError
    transform                   train: random resized crop + flip (swapping "left"/"right" in the caption);
                                eval: bicubic resize; then CLIP normalisation. Randomness per (seed, epoch, key)
    batch                       ``batch_size`` samples of one worker → one batch with the cursor after its last sample

``make_loader`` is infinite: epochs roll over inside each worker, so a step-driven trainer on every rank always gets
a next batch and no collective waits on a rank that ran out of data. When the manifest gives sample counts and
ranks hold unequal numbers of samples, each rank pads its epoch by wrapping around its own shards (as
``DistributedSampler`` does) so every rank delivers the same number of samples per epoch; with fewer shards than
ranks (or workers) the split falls back to interleaving samples of shared shards.

    loader = make_loader(cfg, rank, world_size, cursor=state.get("data_cursor"))
    cursor = Cursor()
    for batch in loader:
        ...  # train on batch["pixel_values"] (B,3,S,S) and batch["captions"]
        cursor.update(batch["cursor"])      # after the batch is consumed
        state["data_cursor"] = cursor.state_dict()   # saved with the checkpoint, one per rank
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import re
import tarfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from expblip.data.shards import resolve_shards, url_to_fs
from expblip.pixels import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

ERROR_KINDS = (
    "truncated_tar",
    "bad_image",
    "too_many_pixels",
    "missing_caption",
    "bad_json",
    "missing_image",
    "shard_unreadable",
)
SHARD_ERRORS = ("truncated_tar", "shard_unreadable")  # each also counts as one unit read, so rates stay <= 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
OPEN_TRIES = 3
OPEN_BACKOFF_S = 0.5
# Errors no retry can fix: the shard is skipped at once.
PERMANENT_OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


class StreamError(RuntimeError):
    """The stream met more bad data than its thresholds allow (or none at all); the message names counts and URLs."""


@dataclass
class StreamConfig:
    """One data stream (train or eval) of one rank."""

    shards: str = ""  # manifest URL / directory / brace pattern
    batch_size: int = 8  # per rank
    num_workers: int = 0  # DataLoader workers per rank (0 = in the main process)
    shuffle_buffer: int = 256  # per-worker sample shuffle buffer (0 = off)
    seed: int = 0
    image_size: int = 64
    train: bool = True  # augment (train) or eval transforms
    crop_scale: float = 0.8  # train: random resized crop keeps [crop_scale, 1] of the area (1.0 = no crop)
    flip: bool = True  # train: horizontal flip with p=0.5 ("left" <-> "right" in the caption)
    max_error_rate: float = 0.05  # stop when skipped/seen exceeds this after min_samples_for_rate
    max_errors: int = 1000  # or when skipped exceeds this count
    max_pixels: int = 64_000_000  # decompression-bomb guard
    resampled: bool = False  # draw shards with replacement (pseudo-epochs of the worker's share of shards)
    lowercase: bool = True  # text is lower-cased (paper)
    min_samples_for_rate: int = 50  # samples read before max_error_rate applies

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"data.crop_scale must lie in (0, 1] (1.0 = no crop), got {self.crop_scale}")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.max_errors < 0 or self.seed < 0:
            raise ValueError("data.num_workers, shuffle_buffer, max_errors and seed must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"data.max_error_rate must lie in [0, 1], got {self.max_error_rate}")


# ---------------------------------------------------------------- which samples each worker reads


@dataclass(frozen=True)
class ShardSlice:
    """Part of one shard: samples ``offset, offset + every, …`` of it, at most ``limit`` of them."""

    url: str
    every: int = 1
    offset: int = 0
    limit: int | None = None  # padding reads only a prefix of a shard

    def length(self, count: int) -> int:
        """Samples this slice yields from a shard holding ``count`` samples."""
        n = len(range(self.offset, count, self.every))
        return n if self.limit is None else min(n, self.limit)


def split_slices(slices: list[ShardSlice], parts: int, part: int) -> list[ShardSlice]:
    """Part ``part`` of ``parts``: whole shards ``[part::parts]`` when there are enough, else interleaved samples."""
    if len(slices) >= parts:
        return slices[part::parts]
    # Fewer shards than parts: every part reads every shard and keeps one sample in `parts` of each slice.
    out = []
    for s in slices:
        limit = None if s.limit is None else len(range(part, s.limit, parts))
        out.append(ShardSlice(s.url, s.every * parts, s.offset + part * s.every, limit))
    return out


def pad_slices(slices: list[ShardSlice], counts: dict[str, int], target: int) -> list[ShardSlice]:
    """``slices`` extended to ``target`` samples by wrapping around them (a rank's share, like DistributedSampler)."""
    total = sum(s.length(counts[s.url]) for s in slices)
    padded, i = list(slices), 0
    while total < target and any(s.length(counts[s.url]) for s in slices):
        s = slices[i % len(slices)]
        take = min(s.length(counts[s.url]), target - total)
        if take:
            padded.append(dataclasses.replace(s, limit=take))
        total, i = total + take, i + 1
    return padded


def _rng(*parts: Any) -> random.Random:
    # A string seed goes through sha512: the same in every process and Python run (unlike hash()).
    return random.Random(":".join(str(p) for p in parts))


def rank_slices(
    shards: list[str],
    counts: list[int] | None,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    shuffle: bool = True,
    pad: bool = True,
) -> list[ShardSlice]:
    """This rank's shards for ``epoch``: the shared seeded order split by rank, padded to the largest rank's size."""
    order = list(shards)
    if shuffle:
        _rng(seed, epoch, "shards").shuffle(order)
    whole = [ShardSlice(u) for u in order]
    mine = split_slices(whole, world, rank)
    if not (pad and counts and world > 1):
        return mine  # counts unknown: ranks may differ in length; the infinite loader still never starves a rank
    by_url = dict(zip(shards, counts, strict=True))
    target = max(sum(s.length(by_url[s.url]) for s in split_slices(whole, world, r)) for r in range(world))
    return pad_slices(mine, by_url, target)


def plan_worker_shards(
    shards: list[str],
    counts: list[int] | None,
    cfg: StreamConfig,
    epoch: int,
    rank: int,
    world: int,
    worker: int,
    workers: int,
    finite: bool = False,
) -> list[ShardSlice]:
    """The shard slices worker ``worker`` of ``rank`` reads in ``epoch`` (finite = one unshuffled, unpadded pass)."""
    if cfg.resampled and not finite:
        rng = _rng(cfg.seed, epoch, rank, worker, "resample")
        n = max(1, math.ceil(len(shards) / (world * workers)))
        return [ShardSlice(rng.choice(shards)) for _ in range(n)]
    mine = rank_slices(shards, counts, cfg.seed, epoch, rank, world, shuffle=not finite, pad=not finite)
    return split_slices(mine, workers, worker)


# ---------------------------------------------------------------- error accounting


class ErrorCounter:
    """Counts skipped data by kind for one worker and raises StreamError past the thresholds."""

    def __init__(self, max_errors: int, max_error_rate: float, min_samples: int = 50) -> None:
        self.max_errors, self.max_error_rate, self.min_samples = max_errors, max_error_rate, min_samples
        self.counts: dict[str, int] = {}
        self.seen = 0  # samples decoded (or tried) + shard-level failures
        self.urls: dict[str, str] = {}  # kind → the latest URL where it happened

    @classmethod
    def unlimited(cls) -> ErrorCounter:
        """Counts, never stops: for one-off passes (evaluation, captioning, counting) that report what they skipped."""
        return cls(max_errors=2**62, max_error_rate=1.0)

    def sample(self) -> None:
        """One more sample read (good or bad)."""
        self.seen += 1
        if self.seen == self.min_samples:
            self._check()

    def add(self, kind: str, url: str, detail: str = "") -> None:
        """One more skipped item of ``kind``; the first of each kind is logged."""
        if kind not in self.counts:
            log.warning("skipping bad data (%s) in %s: %s; further %s are counted quietly", kind, url, detail, kind)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.urls[kind] = url
        if kind in SHARD_ERRORS:
            self.seen += 1
        self._check()

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def _check(self) -> None:
        rate = self.skipped / max(self.seen, 1)
        if self.skipped > self.max_errors or (self.seen >= self.min_samples and rate > self.max_error_rate):
            where = ", ".join(f"{k}: {u}" for k, u in sorted(self.urls.items()))
            raise StreamError(
                f"too much bad data: {self.skipped} skipped of {self.seen} read {dict(sorted(self.counts.items()))} "
                f"(limits: max_errors={self.max_errors}, max_error_rate={self.max_error_rate}); latest per kind: "
                f"{where}. Fix or regenerate those shards, or raise data.max_errors / data.max_error_rate"
            )


# ---------------------------------------------------------------- reading shards


def open_shard(url: str, tries: int = OPEN_TRIES, backoff_s: float | None = None) -> tuple[IO[bytes], int | None]:
    """(binary stream, size in bytes) for ``url``; transient failures are retried with exponential back-off."""
    backoff_s = OPEN_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(tries):
        try:
            fs, path = url_to_fs(url)
            f = fs.open(path, "rb")
            size = getattr(f, "size", None)
            return f, size if isinstance(size, int) else fs.size(path)
        except PERMANENT_OPEN_ERRORS:
            raise
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def tar_members(stream: IO[bytes], size: int | None) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, data) of each regular member; raises tarfile.ReadError when the tar is cut short."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)  # webdataset's base_plus_ext
        if info.isreg() and match and not info.name.startswith("__"):
            data = tar.extractfile(info).read()  # raises ReadError("unexpected end of data") if cut mid-member
            yield match.group(1), match.group(2).lower(), data
        tar.members = []  # stream mode would otherwise keep every TarInfo
    # tarfile ends silently when a tar is cut exactly at a header: a whole tar still has a zero block left here.
    if size is not None and size - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"tar ends at byte {size} without an end-of-archive block")


def read_shard(url: str, errors: ErrorCounter) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one shard; an unreadable or cut-off shard is counted.

    When a tar is cut off, the sample being read at that point is dropped with it (it may lack members).
    """
    try:
        stream, size = open_shard(url)
    except Exception as exn:
        errors.add("shard_unreadable", url, repr(exn))
        return
    with stream:
        sample: dict | None = None
        try:
            for key, ext, data in tar_members(stream, size):
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key, "__url__": url}
                sample[ext] = data
        except Exception as exn:  # a cut-off tar, a corrupt header, a dropped connection
            errors.add("truncated_tar", url, repr(exn))
            return
        if sample is not None:
            yield sample


def read_slices(slices: Iterable[ShardSlice], errors: ErrorCounter) -> Iterator[dict]:
    """The samples of each slice in turn."""
    for s in slices:
        if s.limit == 0:
            continue
        kept = 0
        for i, sample in enumerate(read_shard(s.url, errors)):
            if i % s.every == s.offset:
                yield sample
                kept += 1
                if kept == s.limit:
                    break  # closes the shard


def shuffled(samples: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """webdataset's buffer shuffle with our seeded generator (buffer filled before the first sample leaves)."""
    if buffer <= 1:
        return samples
    import webdataset as wds

    return wds.filters.shuffle(bufsize=buffer, initial=buffer, rng=rng)(samples)


# ---------------------------------------------------------------- decoding


class _Skip(Exception):
    """A sample is bad in a way counted under ``kind``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def parse_labels(raw: dict) -> dict:
    """The sample's JSON labels ({} without a json member); malformed or non-UTF-8 JSON is ``bad_json``."""
    if "json" not in raw:
        return {}
    try:
        labels = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exn:
        raise _Skip("bad_json", repr(exn)) from None
    if not isinstance(labels, dict):
        raise _Skip("bad_json", f"expected a JSON object, got {type(labels).__name__}")
    return labels


def sample_captions(labels: dict, raw: dict) -> list[str]:
    """Non-empty captions from the labels' "captions", else the txt member; none is ``missing_caption``."""
    captions = labels.get("captions")
    captions = [c for c in captions if isinstance(c, str) and c.strip()] if isinstance(captions, list) else []
    if not captions and "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        captions = [text] if text else []
    if not captions:
        raise _Skip("missing_caption", "no captions in json and no txt")
    return captions


def load_image(raw: dict, max_pixels: int) -> Image.Image:
    """The RGB image; the pixel count is checked from the header before any pixel is decoded."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise _Skip("missing_image", f"no member among {IMAGE_EXTS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own guard, as an error
            img = Image.open(io.BytesIO(raw[ext]), formats=["PNG", "JPEG", "WEBP"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise _Skip("too_many_pixels", str(exn)) from None
    except Exception as exn:
        raise _Skip("bad_image", repr(exn)) from None
    if img.width * img.height > max_pixels:
        raise _Skip("too_many_pixels", f"{img.width}x{img.height} > max_pixels={max_pixels}")
    try:
        return img.convert("RGB")  # decodes now; a corrupt or truncated body fails here
    except Exception as exn:
        raise _Skip("bad_image", repr(exn)) from None


def decode_sample(raw: dict, max_pixels: int) -> tuple[dict, list[str], Image.Image]:
    """(labels, captions, image) with the cheap checks first; raises _Skip for bad data."""
    labels = parse_labels(raw)
    captions = sample_captions(labels, raw)
    return labels, captions, load_image(raw, max_pixels)


# ---------------------------------------------------------------- transforms (PIL + numpy; no torchvision here)


_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """'left' ↔ 'right' as whole words, keeping case: a mirrored face's left brow is the caption's right brow."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(swap, text)


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop: a random area/aspect box (10 tries, else the centre), resized bicubic."""
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randrange(height - h + 1), rng.randrange(width - w + 1)
            return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
_INV_STD = 1.0 / (torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → ByteTensor[3, H, W] (one copy of the pixels)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """ByteTensor[B, 3, H, W] → FloatTensor, CLIP-normalised: ((x / 255) - mean) / std, once per batch."""
    return (pixels.float() - _MEAN) * _INV_STD


def _sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's augmentation: the same (seed, epoch, key) draws the same crop in any process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def transform(
    image: Image.Image, captions: list[str], cfg: StreamConfig, epoch: int, key: str
) -> tuple[torch.Tensor, str]:
    """(pixels uint8 [3,S,S], caption): caption choice, crop and flip drawn from a generator seeded by
    (seed, epoch, key). Normalisation happens per batch (``normalise``), where it is vectorised."""
    rng = _sample_rng(cfg.seed, epoch, key)
    caption = captions[rng.randrange(len(captions))]
    if cfg.train and cfg.crop_scale < 1.0:
        image = random_resized_crop(image, cfg.image_size, rng, scale=(cfg.crop_scale, 1.0))
    else:
        image = image.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    if cfg.train and cfg.flip and rng.random() < 0.5:
        image, caption = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), swap_left_right(caption)
    return to_uint8(image), caption.lower() if cfg.lowercase else caption


# ---------------------------------------------------------------- cursor


class Cursor:
    """Where each data worker of one rank stands: the (epoch, index) after the last sample the trainer consumed.

    Update it with every consumed batch (``cursor.update(batch["cursor"])``), save ``state_dict()`` with the
    checkpoint, and pass that state (or the Cursor) to ``make_loader`` to continue exactly where training stopped.
    """

    def __init__(
        self,
        positions: dict[int, tuple[int, int]] | None = None,
        num_workers: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        rank: int | None = None,
    ) -> None:
        self.positions = dict(positions or {})  # worker → (epoch, index of the next sample)
        self.num_workers, self.world_size, self.rank = num_workers, world_size, rank  # the layout of the positions
        self.epoch = epoch  # where workers without a position start

    def update(self, batch_cursor: dict) -> None:
        """Records a consumed batch's ``batch["cursor"]``."""
        self.positions[int(batch_cursor["worker"])] = (int(batch_cursor["epoch"]), int(batch_cursor["index"]))
        self.num_workers = batch_cursor.get("num_workers", self.num_workers)
        self.world_size = batch_cursor.get("world_size", self.world_size)
        self.rank = batch_cursor.get("rank", self.rank)

    def position(self, worker: int) -> tuple[int, int]:
        """(epoch, samples to skip) for ``worker``."""
        return self.positions.get(worker, (self.epoch, 0))

    def state_dict(self) -> dict:
        """JSON-able state."""
        return {
            "epoch_index": {str(w): list(p) for w, p in sorted(self.positions.items())},
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "epoch": self.epoch,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Cursor:
        """The inverse of ``state_dict``."""
        positions = {int(w): (int(p[0]), int(p[1])) for w, p in state.get("epoch_index", {}).items()}
        layout = state.get("num_workers"), state.get("world_size")
        return cls(positions, *layout, epoch=int(state.get("epoch", 0)), rank=state.get("rank"))

    def at_epoch_start(self) -> Cursor:
        """A layout-free cursor at the start of the earliest epoch in progress (repeats part of that epoch)."""
        return Cursor(epoch=min((e for e, _ in self.positions.values()), default=self.epoch))

    def check_layout(self, num_workers: int, world_size: int, rank: int) -> None:
        """Positions are per (rank split, worker split): resuming under another layout would repeat or skip data."""
        if self.positions and self.rank is not None and self.rank != rank:
            raise ValueError(
                f"rank {rank} was given the data cursor of rank {self.rank}: every rank must save and restore its own"
            )
        saved = (self.num_workers, self.world_size)
        if self.positions and saved != (num_workers, world_size):
            raise ValueError(
                f"the data cursor was saved with num_workers={saved[0]} (effective) and world_size={saved[1]}, but "
                f"this run has {num_workers} and {world_size}: resume with the saved data.*.num_workers and number "
                f"of ranks, or pass Cursor.from_state_dict(state).at_epoch_start() to restart epoch "
                f"{self.at_epoch_start().epoch} from its beginning"
            )


# ---------------------------------------------------------------- the stream


class ShardStream(IterableDataset):
    """The per-worker pipeline (see the module docstring); yields collated batches."""

    def __init__(
        self,
        cfg: StreamConfig,
        shards: list[str],
        counts: list[int] | None,
        rank: int,
        world_size: int,
        start: Cursor,
        finite: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.shards, self.counts, self.start, self.finite = cfg, shards, counts, start, finite
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        Image.MAX_IMAGE_PIXELS = self.cfg.max_pixels  # PIL's own guard, in this worker process
        errors = ErrorCounter(self.cfg.max_errors, self.cfg.max_error_rate, self.cfg.min_samples_for_rate)
        epoch, skip = self.start.position(worker)
        numbered = self._numbered(worker, workers, epoch, skip, errors)
        samples = self._decoded(numbered, errors)
        return _errors_as_batches(self._batches(samples, worker, workers, errors))

    def _epoch_samples(self, epoch: int, worker: int, workers: int, errors: ErrorCounter) -> Iterator[dict]:
        slices = plan_worker_shards(
            self.shards, self.counts, self.cfg, epoch, self.rank, self.world_size, worker, workers, finite=self.finite
        )
        samples = read_slices(slices, errors)
        if self.finite:
            return samples
        return shuffled(samples, self.cfg.shuffle_buffer, _rng(self.cfg.seed, epoch, self.rank, worker, "samples"))

    def _numbered(
        self, worker: int, workers: int, epoch: int, skip: int, errors: ErrorCounter
    ) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index, raw sample) from ``epoch`` on, skipping the first ``skip`` samples undecoded."""
        while True:
            n, skipped_before = 0, errors.skipped
            for n, raw in enumerate(self._epoch_samples(epoch, worker, workers, errors), start=1):
                if n > skip:
                    yield epoch, n - 1, raw
            if self.finite:
                return
            # Epochs that only fail feed the error thresholds, which end the stream; epochs with neither samples nor
            # errors (empty tars, more workers than samples) would spin here forever.
            if n == 0 and errors.skipped == skipped_before:
                raise StreamError(
                    f"data worker {worker}/{workers} of rank {self.rank}/{self.world_size} read no samples in epoch "
                    f"{epoch} and met no errors (shards: {self.shards[:4]}…): the shards are empty, or there are more "
                    "data workers x ranks than samples; check the shards or use fewer data workers"
                )
            epoch, skip = epoch + 1, 0

    def _decoded(
        self, numbered: Iterator[tuple[int, int, dict]], errors: ErrorCounter
    ) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index, sample ready for collation); bad samples are counted and left out."""
        for epoch, index, raw in numbered:
            errors.sample()
            try:
                labels, captions, image = decode_sample(raw, self.cfg.max_pixels)
                pixels, caption = transform(image, captions, self.cfg, epoch, raw["__key__"])
            except _Skip as bad:
                errors.add(bad.kind, raw["__url__"], f"{raw['__key__']}: {bad}")
                continue
            yield epoch, index, {"pixel_values": pixels, "caption": caption, "labels": labels, "key": raw["__key__"]}

    def _batches(
        self, samples: Iterator[tuple[int, int, dict]], worker: int, workers: int, errors: ErrorCounter
    ) -> Iterator[dict]:
        """Groups ``batch_size`` samples of this worker; a finite stream also yields its last, smaller batch."""
        batches = self._grouped(samples, worker, workers, errors)
        return _with_final_errors(batches, errors) if self.finite else batches

    def _grouped(
        self, samples: Iterator[tuple[int, int, dict]], worker: int, workers: int, errors: ErrorCounter
    ) -> Iterator[dict]:
        items: list[tuple[int, int, dict]] = []
        for item in samples:
            items.append(item)
            if len(items) == self.cfg.batch_size:
                yield self._collate(items, worker, workers, errors)
                items = []
        if items and self.finite:
            yield self._collate(items, worker, workers, errors)

    def _collate(self, items: list[tuple[int, int, dict]], worker: int, workers: int, errors: ErrorCounter) -> dict:
        epoch, index, _ = items[-1]
        samples = [s for _, _, s in items]
        cursor = {
            "worker": worker,
            "epoch": epoch,
            "index": index + 1,
            "num_workers": workers,
            "world_size": self.world_size,
            "rank": self.rank,
        }
        return {
            "pixel_values": normalise(torch.stack([s["pixel_values"] for s in samples])),  # [B, 3, S, S] float
            "captions": [s["caption"] for s in samples],
            "labels": [s["labels"] for s in samples],
            "keys": [s["key"] for s in samples],
            "cursor": cursor,
            "errors": dict(errors.counts),
        }


def _with_final_errors(batches: Iterator[dict], errors: ErrorCounter) -> Iterator[dict]:
    """A finite stream's last batch reports every error of the pass, also those met after it filled (a cut tar)."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is not None:
        held["errors"] = dict(errors.counts)
        yield held


def _errors_as_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """Hands a StreamError to the main process as an item: raised inside a DataLoader worker it would arrive
    re-wrapped with the worker's traceback as text, and torch then takes 5 s to shut that worker down."""
    try:
        yield from batches
    except StreamError as exn:
        yield {"stream_error": str(exn)}


class BatchLoader:
    """Iterates a DataLoader over a ShardStream, raising a worker's StreamError here as itself."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        while (batch := next(batches, None)) is not None:  # not `for`: its hidden reference would survive `del`
            if "stream_error" in batch:
                # Shut the workers down now: left to the garbage collector inside the exception's reference cycle,
                # their queues may be finalised first and each worker then lingers until torch's 5 s join timeout.
                del batches
                raise StreamError(batch["stream_error"])
            yield batch


def _as_cursor(cursor: Cursor | dict | None) -> Cursor:
    if cursor is None:
        return Cursor()
    return cursor if isinstance(cursor, Cursor) else Cursor.from_state_dict(cursor)


def _loader(dataset: ShardStream, num_workers: int) -> BatchLoader:
    # batch_size=None: batches are collated inside the worker, so a batch never mixes workers. No persistent
    # workers: the loader is iterated once (epochs roll over inside the workers), and a persistent DataLoader would
    # keep its iterator (and worker processes) alive after an error.
    # collate_fn: batches arrive collated; the default conversion would walk every batch's nested labels again.
    return BatchLoader(DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                  collate_fn=_as_is))


def _as_is(batch: dict) -> dict:
    return batch


def make_loader(cfg: StreamConfig, rank: int, world_size: int, cursor: Cursor | dict | None = None) -> Iterable[dict]:
    """An infinite iterable of batches for ``rank`` of ``world_size``, resuming at ``cursor`` (a Cursor state)."""
    shards, counts = resolve_shards(cfg.shards)
    start = _as_cursor(cursor)
    start.check_layout(max(1, cfg.num_workers), world_size, rank)
    return _loader(ShardStream(cfg, shards, counts, rank, world_size, start), cfg.num_workers)


def iterate_once(cfg: StreamConfig, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """One pass over this rank's shards in order, no padding or shuffling, eval transforms; finite.

    The last batch of each worker may be smaller and carries that worker's error counts for the whole pass. With
    several ranks, each sees ``shards[rank::world_size]`` (sample-interleaved when there are too few shards).
    """
    shards, counts = resolve_shards(cfg.shards)
    cfg = dataclasses.replace(cfg, train=False, shuffle_buffer=0)
    dataset = ShardStream(cfg, shards, counts, rank, world_size, Cursor(), finite=True)
    yield from _loader(dataset, cfg.num_workers)


def read_captions(cfg: StreamConfig) -> list[str]:
    """Every caption of every readable sample, in shard order, as training sees them (lower-cased when
    ``cfg.lowercase``); images are not decoded, bad samples are left out. For building a tokenizer."""
    shards, _ = resolve_shards(cfg.shards)
    errors = ErrorCounter.unlimited()
    captions: list[str] = []
    for url in shards:
        for raw in read_shard(url, errors):
            try:
                found = sample_captions(parse_labels(raw), raw)
            except _Skip:
                continue
            captions.extend(c.lower() if cfg.lowercase else c for c in found)
    return captions


def count_samples(spec: str | list[str]) -> int:
    """Samples in a shard spec: from the manifest when there is one, else by reading every shard."""
    shards, counts = resolve_shards(spec)
    if counts is not None:
        return sum(counts)
    errors = ErrorCounter.unlimited()
    return sum(1 for url in shards for _ in read_shard(url, errors))
