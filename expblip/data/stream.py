"""Shards → training batches: one seeded order at any world size, exact resumes, storage outages and bad data survived.

Training (``make_loader``) walks the endless global sequence of expblip.data.order: rank r of W takes, step after
step, the next B positions after every lower rank's, so the samples consumed up to a step do not depend on how many
ranks or data workers there are, and one number (the global position) says where a run stands. A resume at any
world size, or any number of data workers, continues at that position: no sample of the epoch repeated or skipped.

The stages of each reader (rank r, data worker w; reader q = r + W·w of R = W × workers takes batches q, q + R, …):

    GlobalOrder.pieces(a, a+B)  which lane positions the batch is: seeded shard order → lanes → window shuffle
    LaneReader                  a lane's shards read in order (open with back-off through storage outages,
                                tar members → samples grouped by key), one window buffered and permuted
    decode                      JSON labels, caption, image (size checked from the header first); bad data is
                                skipped and counted by kind (its slot takes a copy of another sample of the batch,
                                so batches stay whole), and too much of it raises StreamError
    transform                   train: random resized crop + flip (swapping "left"/"right" in the caption);
                                eval: bicubic resize. Randomness per (seed, epoch, key)
    batch                       B samples → one batch with its cursor: the global position once every rank has
                                taken its batch of the same index. Training batches keep uint8 pixels (a quarter
                                of fp32's bytes through worker queues, pinned memory and the copy to a GPU); the
                                loop normalises them on its device (expblip.pixels.normalise). ``iterate_once``'s
                                batches are CLIP-normalised fp32, for evaluators on the CPU.

Storage that stops answering (connection refused, reset, timeouts) is retried with exponential back-off, resuming
at the sample where the read stopped, for up to ``max_outage_s``; past that the stream raises StorageOutage. Data
that is wrong (a cut tar, a bad image) is skipped and counted, never retried. The loop (expblip.train.loop) makes
every rank agree before a step: all take their batch, or all stop with the same error.

``make_loader`` is infinite, so a step-driven trainer on every rank always gets a whole next batch and no collective
waits on a rank that ran out of data. ``iterate_once`` is the finite pass (evaluation, captioning): each rank's
shards in order, no shuffling.

    loader = make_loader(cfg, rank, world_size, cursor=state.get("data_cursor"))
    cursor = Cursor()
    for batch in loader:
        ...  # train on normalise(batch["pixel_values"]) (B,3,S,S uint8) and batch["captions"]
        cursor.update(batch["cursor"])      # after the batch is consumed (by every rank)
        state["data_cursor"] = cursor.state_dict()   # saved with the checkpoint; the same on every rank
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
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
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from expblip.data.order import GlobalOrder, batch_start, position_after, window_permutation
from expblip.data.shards import resolve_shards, url_to_fs
from expblip.pixels import AspectError, check_bounds, dynamic_shape
from expblip.pixels import normalise_batch as normalise_pixels

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
OPEN_BACKOFF_S = 0.5  # first wait after a storage failure; doubled after each further failure in a row
MAX_BACKOFF_S = 8.0
DEFAULT_MAX_OUTAGE_S = 120.0  # data.max_outage_s
# Errors no retry can fix: the shard is skipped at once.
PERMANENT_OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


class StreamError(RuntimeError):
    """The stream met more bad data than its thresholds allow (or none at all); the message names counts and URLs."""


class StorageOutage(StreamError):
    """Storage did not answer for longer than ``max_outage_s``; the message names the URL and the limit."""


@dataclass
class StreamConfig:
    """One data stream (train or eval) of one rank."""

    shards: str = ""  # manifest URL / directory / brace pattern
    batch_size: int = 8  # per rank
    num_workers: int = 0  # DataLoader workers per rank (0 = in the main process)
    shuffle_buffer: int = 256  # samples of a lane permuted together (the order's shuffle window; 0 = off)
    # shard streams interleaved in the order (see expblip.data.order); ranks x data workers dividing it read every
    # shard exactly once, other counts read shards they share and skip what is not theirs. Part of the order: a
    # resume must keep it (as seed, shuffle_buffer and batch_size)
    lanes: int = 16
    seed: int = 0
    image_size: int = 64
    # (min_pixels, max_pixels, unit): each image resized, aspect kept, to a multiple of unit px holding between
    # min_pixels and max_pixels pixels (Qwen2.5-VL's dynamic resolution; the batch a list of [3, H_i, W_i]); () =
    # square image_size x image_size. The training loop sets it from model.min_pixels / model.max_pixels
    dynamic: tuple[int, ...] = ()
    train: bool = True  # augment (train) or eval transforms
    crop_scale: float = 0.8  # train: random resized crop keeps [crop_scale, 1] of the area (1.0 = no crop)
    flip: bool = True  # train: horizontal flip with p=0.5 ("left" <-> "right" in the caption)
    max_error_rate: float = 0.05  # stop when skipped/seen exceeds this after min_samples_for_rate
    max_errors: int = 1000  # or when skipped exceeds this count
    max_pixels: int = 64_000_000  # decompression-bomb guard
    resampled: bool = False  # draw each epoch's shards with replacement
    lowercase: bool = True  # text is lower-cased (paper)
    min_samples_for_rate: int = 50  # samples read before max_error_rate applies

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "max_pixels", "lanes"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.dynamic:
            if len(self.dynamic) != 3:
                raise ValueError(f"data.dynamic is (min_pixels, max_pixels, unit), got {self.dynamic}")
            check_bounds(tuple(self.dynamic), "data.dynamic: ")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"data.crop_scale must lie in (0, 1] (1.0 = no crop), got {self.crop_scale}")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.max_errors < 0 or self.seed < 0:
            raise ValueError("data.num_workers, shuffle_buffer, max_errors and seed must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"data.max_error_rate must lie in [0, 1], got {self.max_error_rate}")


# ---------------------------------------------------------------- a finite pass: which samples each worker reads


@dataclass(frozen=True)
class ShardSlice:
    """Part of one shard: samples ``offset, offset + every, …`` of it."""

    url: str
    every: int = 1
    offset: int = 0


def split_slices(slices: list[ShardSlice], parts: int, part: int) -> list[ShardSlice]:
    """Part ``part`` of ``parts``: whole shards ``[part::parts]`` when there are enough, else interleaved samples."""
    if len(slices) >= parts:
        return slices[part::parts]
    # Fewer shards than parts: every part reads every shard and keeps one sample in `parts` of each slice.
    return [ShardSlice(s.url, s.every * parts, s.offset + part * s.every) for s in slices]


def plan_finite(shards: list[str], rank: int, world: int, worker: int, workers: int) -> list[ShardSlice]:
    """The shard slices worker ``worker`` of ``rank`` reads in a finite pass: shards in order, split by rank, then
    by worker (sample-interleaved when there are fewer shards than parts)."""
    mine = split_slices([ShardSlice(u) for u in shards], world, rank)
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


# ---------------------------------------------------------------- reading shards through storage outages


class Outage:
    """One reader's view of its storage: transient failures in a row are retried with exponential back-off until
    ``max_s`` have passed since the first of them, then StorageOutage. Any successful read ends the outage."""

    def __init__(self, max_s: float = DEFAULT_MAX_OUTAGE_S) -> None:
        self.max_s, self.since, self.tries = max_s, None, 0

    def failed(self, url: str, exn: BaseException) -> None:
        """Called after a transient failure: waits before the next try, or raises when the outage is too long."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning(
                "storage unreachable reading %s (%s): retrying with back-off for up to %g s (data.max_outage_s)",
                url,
                _brief(exn),
                self.max_s,
            )
        waited = now - self.since
        if waited >= self.max_s:
            raise StorageOutage(
                f"storage unreachable for {waited:.0f} s reading {url} ({_brief(exn)}), longer than "
                f"data.max_outage_s={self.max_s:g}: check the endpoint (AWS_ENDPOINT_URL) and the "
                "server, or raise data.max_outage_s"
            )
        time.sleep(min(OPEN_BACKOFF_S * 2 ** min(self.tries, 16), MAX_BACKOFF_S, self.max_s - waited))
        self.tries += 1

    def ok(self) -> None:
        if self.since is not None:
            log.warning(
                "storage reachable again after %.1f s; reading on where it stopped", time.monotonic() - self.since
            )
        self.since, self.tries = None, 0


def _brief(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {str(exn)[:200]}"


def open_shard(url: str) -> tuple[IO[bytes], int | None]:
    """(binary stream, size in bytes) for ``url``; one attempt (shard_slots retries)."""
    fs, path = url_to_fs(url)
    f = fs.open(path, "rb")
    size = getattr(f, "size", None)
    return f, size if isinstance(size, int) else fs.size(path)


def tar_samples(stream: IO[bytes], size: int | None, url: str, start: int = 0) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` from the ``start``-th on (members of earlier ones are passed
    over unread); raises tarfile.ReadError when the tar is cut short (the sample being read is then not yielded)."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    index, key, sample = -1, None, None
    for info in tar:
        match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)  # webdataset's base_plus_ext
        if info.isreg() and match and not info.name.startswith("__"):
            if match.group(1) != key:
                if sample is not None:
                    yield sample
                key, sample, index = match.group(1), None, index + 1
                if index >= start:
                    sample = {"__key__": key, "__url__": url}
            if sample is not None:  # raises ReadError("unexpected end of data") if cut mid-member
                sample[match.group(2).lower()] = tar.extractfile(info).read()
        tar.members = []  # stream mode would otherwise keep every TarInfo
    # tarfile ends silently when a tar is cut exactly at a header: a whole tar still has a zero block left here.
    if size is not None and size - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"tar ends at byte {size} without an end-of-archive block")
    if sample is not None:
        yield sample


def shard_slots(
    url: str, errors: ErrorCounter, outage: Outage, count: int | None = None, start: int = 0
) -> Iterator[dict | None]:
    """The shard's samples from index ``start`` on. With ``count`` (the manifest's), exactly ``count - start`` items:
    None where a sample is missing (the shard is cut short or unreadable, counted once in ``errors``).

    Storage failures are retried (``outage``), reopening the shard and skipping to the sample where the read stopped;
    data errors are counted: a missing or unopenable shard (shard_unreadable), a cut or corrupt tar (truncated_tar).
    """
    index = start
    while count is None or index < count:
        try:
            stream, size = open_shard(url)
        except PERMANENT_OPEN_ERRORS as exn:
            errors.add("shard_unreadable", url, repr(exn))
            break
        except Exception as exn:  # connection refused, timeouts, 5xx: the storage, not the data
            outage.failed(url, exn)
            continue
        try:
            with stream:
                for sample in tar_samples(stream, size, url, index):
                    outage.ok()
                    yield sample
                    index += 1
                    if index == count:
                        return  # more samples than the manifest says: the order counts only the manifest's
            break
        except tarfile.TarError as exn:  # a cut-off tar or a corrupt header: the data
            errors.add("truncated_tar", url, repr(exn))
            break
        except Exception as exn:  # a dropped connection mid-read: reopen and continue at `index`
            outage.failed(url, exn)
    if count is not None:
        yield from itertools.repeat(None, count - index)


def read_shard(url: str, errors: ErrorCounter, outage: Outage | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one shard; an unreadable or cut-off shard is counted.

    When a tar is cut off, the sample being read at that point is dropped with it (it may lack members).
    """
    yield from shard_slots(url, errors, outage or Outage())


def read_slices(slices: Iterable[ShardSlice], errors: ErrorCounter, outage: Outage) -> Iterator[dict]:
    """The samples of each slice in turn (a finite pass)."""
    for s in slices:
        for i, sample in enumerate(shard_slots(s.url, errors, outage)):
            if i % s.every == s.offset:
                yield sample


class LaneReader:
    """One lane of one epoch, read forward: ``get(p)`` is the raw sample at lane position p, or None.

    Positions below the lane's tail length are its raw samples as stored (the tail); the head after them is permuted
    within windows of ``window`` samples (GlobalOrder's shuffle). One window of raw samples is held at a time; the
    reader skips forward through shards by their manifest counts (whole shards unopened) and reopens when asked for
    an earlier window.
    """

    def __init__(
        self, order: GlobalOrder, epoch: int, lane: int, window: int, errors: ErrorCounter, outage: Outage
    ) -> None:
        plan = order.plan(epoch)
        self.shards = plan.lanes[lane]  # [(url, count)] in reading order
        self.bounds = list(itertools.accumulate((c for _, c in self.shards), initial=0))  # lane position of each
        self.tail = plan.tails[lane]
        self.seed, self.epoch, self.lane, self.window = order.seed, epoch, lane, max(1, window)
        self.errors, self.outage = errors, outage
        self.current, self.lo, self.samples = None, 0, []  # window id, its first position, its raw samples
        self.raw: Iterator[dict | None] | None = None
        self.raw_pos = 0  # lane position the raw iterator yields next

    def get(self, pos: int) -> dict | None:
        if pos < self.tail:  # the tail: as stored, in windows ending at the head
            key, lo, hi = ("tail", pos // self.window), pos - pos % self.window, self.tail
        else:
            w = (pos - self.tail) // self.window
            key, lo, hi = ("head", w), self.tail + w * self.window, self.bounds[-1]
        if key != self.current:
            self._load(key, lo, min(lo + self.window, hi))
        return self.samples[pos - self.lo]

    def _load(self, key: tuple, lo: int, hi: int) -> None:
        if self.raw is None or lo < self.raw_pos or self._shard(lo) != self._shard(self.raw_pos):
            self._seek(lo)
        for _ in range(lo - self.raw_pos):  # later in the same shard: read on, undecoded
            next(self.raw)
        raw = [next(self.raw) for _ in range(hi - lo)]
        self.raw_pos = hi
        if key[0] == "head" and self.window > 1:
            raw = [raw[i] for i in window_permutation(self.seed, self.epoch, self.lane, key[1], len(raw))]
        self.current, self.lo, self.samples = key, lo, raw

    def _shard(self, pos: int) -> int:
        return next(k for k in range(len(self.shards)) if pos < self.bounds[k + 1]) if pos < self.bounds[-1] else -1

    def _seek(self, pos: int) -> None:
        k = self._shard(pos)

        def raw() -> Iterator[dict | None]:
            for i in range(k, len(self.shards)):
                url, count = self.shards[i]
                yield from shard_slots(url, self.errors, self.outage, count, pos - self.bounds[k] if i == k else 0)

        if self.raw is not None:
            self.raw.close()
        self.raw, self.raw_pos = raw(), pos

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()


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


def load_image(raw: dict, max_pixels: int, draft_side: int = 0) -> Image.Image:
    """The RGB image; the pixel count is checked from the header before any pixel is decoded. ``draft_side``: a
    JPEG is decoded at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps its short side at least this
    long (PIL's ``draft``): a 640x480 face for a 224-px model decodes at 320x240, a quarter of the work. The stream
    asks for image_size: a random crop of area crop_scale is then enlarged by at most 1/sqrt(crop_scale) (12 % at
    0.8), as it would be from any image that size."""
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
    if draft_side and img.format == "JPEG" and min(img.size) >= 2 * draft_side:
        scale = min(img.size) / draft_side  # draft keeps both sides >= the requested box
        img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))
    try:
        return img.convert("RGB")  # decodes now; a corrupt or truncated body fails here
    except Exception as exn:
        raise _Skip("bad_image", repr(exn)) from None


def decode_sample(raw: dict, max_pixels: int, draft_side: int = 0) -> tuple[dict, list[str], Image.Image]:
    """(labels, captions, image) with the cheap checks first; raises _Skip for bad data."""
    labels = parse_labels(raw)
    captions = sample_captions(labels, raw)
    return labels, captions, load_image(raw, max_pixels, draft_side)



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
    size: int | tuple[int, int],
    rng: random.Random,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    keep_aspect: bool = False,
) -> Image.Image:
    """torchvision's RandomResizedCrop: a random area/aspect box (crop_box), resized bicubic to `size` (a side, or
    (width, height))."""
    size = (size, size) if isinstance(size, int) else size
    return img.resize(size, Image.Resampling.BICUBIC, box=crop_box(img.width, img.height, rng, scale, ratio, keep_aspect))


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3), keep_aspect: bool = False) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random box of `scale` of the area and `ratio` of width / height (10 tries),
    else the centred square (torchvision's). keep_aspect (dynamic resolution, where the box is resized to the
    image's own aspect): the ratios are relative to the image's aspect, and the fallback is the whole image."""
    area = width * height
    if keep_aspect:
        ratio = (ratio[0] * width / height, ratio[1] * width / height)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randrange(height - h + 1), rng.randrange(width - w + 1)
            return left, top, left + w, top + h
    if keep_aspect:
        return 0, 0, width, height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → ByteTensor[3, H, W] (one copy of the pixels)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """ByteTensor[B, 3, H, W] (or a ragged list) → float, CLIP-normalised (expblip.pixels.normalise), per batch."""
    return normalise_pixels(pixels)


def _sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's augmentation: the same (seed, epoch, key) draws the same crop in any process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def transform(
    image: Image.Image, captions: list[str], cfg: StreamConfig, epoch: int, key: str
) -> tuple[torch.Tensor, str]:
    """(pixels uint8 [3,H,W], caption): caption choice, crop and flip drawn from a generator seeded by
    (seed, epoch, key). H x W: image_size square, or (data.dynamic) the image's own aspect within its bounds (a crop
    is resized to the whole image's size: every epoch gives an image the same number of tokens). Normalisation
    happens per batch (``normalise``), where it is vectorised."""
    rng = _sample_rng(cfg.seed, epoch, key)
    caption = captions[rng.randrange(len(captions))]
    size = target_size(image, cfg)
    if cfg.train and cfg.crop_scale < 1.0:
        image = random_resized_crop(image, size, rng, (cfg.crop_scale, 1.0), keep_aspect=bool(cfg.dynamic))
    else:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if cfg.train and cfg.flip and rng.random() < 0.5:
        image, caption = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), swap_left_right(caption)
    return to_uint8(image), caption.lower() if cfg.lowercase else caption


def target_size(image: Image.Image, cfg: StreamConfig) -> tuple[int, int]:
    """(width, height) the stream resizes `image` to: image_size square, or its dynamic size (data.dynamic)."""
    if not cfg.dynamic:
        return cfg.image_size, cfg.image_size
    height, width = dynamic_shape(image.height, image.width, tuple(cfg.dynamic))
    return width, height


# ---------------------------------------------------------------- cursor


ORDER_KEYS = ("seed", "lanes", "shuffle_buffer", "batch_size", "resampled")  # what defines the sequence, besides shards


def order_identity(cfg: StreamConfig, counts: list[int]) -> dict:
    """What a saved position means: the config keys that define the sequence, and the shards' size."""
    return {**{k: getattr(cfg, k) for k in ORDER_KEYS}, "shards": len(counts), "samples": sum(counts)}


class Cursor:
    """Where training stands in the global order: the samples every rank together has consumed (``position``),
    the same number on every rank and at any world size.

    Update it with every consumed batch (``cursor.update(batch["cursor"])``), save ``state_dict()`` with the
    checkpoint, and pass that state (or the Cursor) to ``make_loader`` to continue exactly where training stopped.
    """

    def __init__(
        self, position: int | None = 0, order: dict | None = None, epoch: int = 0, epoch_sample: int = 0
    ) -> None:
        self.position = position  # None: a cursor of an older layout, resumed at the start of `epoch`
        self.order = order  # order_identity() of the stream it was saved from
        self.epoch, self.epoch_sample = epoch, epoch_sample  # for people: the epoch at `position` and how far into it

    def update(self, batch_cursor: dict) -> None:
        """Records a consumed batch's ``batch["cursor"]``."""
        self.position = int(batch_cursor["position"])
        self.order = batch_cursor.get("order", self.order)
        self.epoch, self.epoch_sample = int(batch_cursor["epoch"]), int(batch_cursor["epoch_sample"])

    def state_dict(self) -> dict:
        """JSON-able state."""
        return {"position": self.position, "order": self.order, "epoch": self.epoch, "epoch_sample": self.epoch_sample}

    @classmethod
    def from_state_dict(cls, state: dict) -> Cursor:
        """The inverse of ``state_dict``; also reads the per-worker cursors of older checkpoints ("epoch_index"),
        which resume at the start of the earliest epoch they were in."""
        if "position" not in state:
            epochs = [int(p[0]) for p in state.get("epoch_index", {}).values()] or [int(state.get("epoch", 0))]
            return cls(None, None, epoch=min(epochs))
        return cls(
            int(state["position"]), state.get("order"), int(state.get("epoch", 0)), int(state.get("epoch_sample", 0))
        )

    def describe(self) -> str:
        return f"global position {self.position} (epoch {self.epoch}, sample {self.epoch_sample} of it)"

    def start(self, order: GlobalOrder, identity: dict) -> int:
        """The position to continue at; refuses a position saved under another order."""
        if self.position is None:
            log.warning("the data cursor predates global positions: restarting epoch %d from its beginning", self.epoch)
            return order.epoch_start(self.epoch)
        differ = {k: (self.order[k], identity[k]) for k in identity if self.order and self.order.get(k) != identity[k]}
        if differ:
            named = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in sorted(differ.items()))
            raise ValueError(
                f"the data cursor was saved for another sample order ({named}): its position would "
                "name other samples. Resume with the saved data.train.seed / lanes / shuffle_buffer / "
                "batch_size / resampled and shards (world size and data workers may change)"
            )
        return self.position


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
        start: int = 0,
        finite: bool = False,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
        order: tuple[GlobalOrder, dict] | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.shards, self.counts, self.start, self.finite = cfg, shards, counts, start, finite
        self.rank, self.world_size, self.max_outage_s = rank, world_size, max_outage_s
        self.order = order  # training: (the global order, its identity), as make_loader built them

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        Image.MAX_IMAGE_PIXELS = self.cfg.max_pixels  # PIL's own guard, in this worker process
        errors = ErrorCounter(self.cfg.max_errors, self.cfg.max_error_rate, self.cfg.min_samples_for_rate)
        outage = Outage(self.max_outage_s)
        if self.finite:
            return _errors_as_batches(_with_final_errors(self._finite(worker, workers, errors, outage), errors))
        return _errors_as_batches(self._walk(worker, workers, errors, outage))

    # ---- training: the global order

    def _walk(self, worker: int, workers: int, errors: ErrorCounter, outage: Outage) -> Iterator[dict]:
        """Batches ``worker``, ``worker + workers``, … of this rank, from global position ``self.start``."""
        cfg = self.cfg
        order, identity = self.order
        lanes: dict[tuple[int, int], LaneReader] = {}
        last: list[dict] = []  # the latest whole batch's samples: stand-ins when every sample of a batch is bad
        try:
            for index in itertools.count(worker, workers):
                first = batch_start(self.start, index, self.rank, self.world_size, cfg.batch_size)
                samples = self._batch_samples(order, first, lanes, errors, outage)
                if not samples and not last:
                    raise StreamError(
                        f"none of the {cfg.batch_size} samples at global position {first} (rank "
                        f"{self.rank}) could be read, and no earlier batch can stand in; see the "
                        "skipped-data warnings above"
                    )
                samples = _whole(samples or last, cfg.batch_size)
                last = samples
                after = position_after(self.start, index, self.world_size, cfg.batch_size)
                epoch = order.epoch_at(after - 1)
                cursor = {
                    "position": after,
                    "epoch": epoch,
                    "epoch_sample": after - order.epoch_start(epoch),
                    "index": index,
                    "worker": worker,
                    "rank": self.rank,
                    "world_size": self.world_size,
                    "order": identity,
                }
                yield _collate(samples, cursor, errors, normalised=False, dynamic=bool(self.cfg.dynamic))
        finally:
            for reader in lanes.values():
                reader.close()

    def _batch_samples(
        self, order: GlobalOrder, first: int, lanes: dict, errors: ErrorCounter, outage: Outage
    ) -> list[dict]:
        """The decoded samples at positions [first, first + B); bad ones are counted and left out."""
        pieces = order.pieces(first, first + self.cfg.batch_size)
        for key in [k for k in lanes if k[0] < pieces[0].epoch]:  # positions only grow: earlier epochs are done
            lanes.pop(key).close()
        out = []
        for piece in pieces:
            key = (piece.epoch, piece.lane)
            if key not in lanes:
                lanes[key] = LaneReader(order, piece.epoch, piece.lane, self.cfg.shuffle_buffer, errors, outage)
            for pos in range(piece.pos, piece.pos + piece.n):
                raw = lanes[key].get(pos)
                sample = self._decode(raw, piece.epoch, errors) if raw is not None else None
                if sample is not None:
                    out.append(sample)
        return out

    def _decode(self, raw: dict, epoch: int, errors: ErrorCounter) -> dict | None:
        errors.sample()
        try:
            draft = 0 if self.cfg.dynamic else self.cfg.image_size  # a dynamic size depends on the full image's
            labels, captions, image = decode_sample(raw, self.cfg.max_pixels, draft)
            pixels, caption = transform(image, captions, self.cfg, epoch, raw["__key__"])
        except AspectError as bad:  # dynamic resolution: an aspect its bounds cannot hold
            errors.add("bad_aspect", raw["__url__"], f"{raw['__key__']}: {bad}")
            return None
        except _Skip as bad:
            errors.add(bad.kind, raw["__url__"], f"{raw['__key__']}: {bad}")
            return None
        return {"pixel_values": pixels, "caption": caption, "labels": labels, "key": raw["__key__"], "epoch": epoch}

    # ---- a finite pass: this rank's shards in order

    def _finite(self, worker: int, workers: int, errors: ErrorCounter, outage: Outage) -> Iterator[dict]:
        slices = plan_finite(self.shards, self.rank, self.world_size, worker, workers)
        items: list[dict] = []
        for index, raw in enumerate(read_slices(slices, errors, outage)):
            sample = self._decode(raw, 0, errors)
            if sample is not None:
                items.append(sample)
            if len(items) == self.cfg.batch_size:
                yield _collate(items, {"worker": worker, "epoch": 0, "index": index + 1}, errors, normalised=True,
                           dynamic=bool(self.cfg.dynamic))
                items = []
        if items:
            yield _collate(items, {"worker": worker, "epoch": 0, "index": index + 1}, errors, normalised=True,
                           dynamic=bool(self.cfg.dynamic))


def _whole(samples: list[dict], size: int) -> list[dict]:
    """``size`` samples: the slots of skipped ones take copies of the others (a batch keeps its size on every rank;
    collectives that gather per-sample features need that)."""
    return [samples[i % len(samples)] for i in range(size)]


def _collate(samples: list[dict], cursor: dict, errors: ErrorCounter, normalised: bool,
             dynamic: bool = False) -> dict:
    images = [s["pixel_values"] for s in samples]
    if dynamic:  # one flat tensor (one shared-memory handle from a data worker), split again by BatchLoader
        sizes = [tuple(p.shape[-2:]) for p in images]
        images = normalise(images) if normalised else images
        ragged = {"pixel_values": torch.cat([p.reshape(-1) for p in images]), "pixel_sizes": sizes}
    else:
        ragged = {"pixel_values": normalise(torch.stack(images)) if normalised else torch.stack(images)}  # [B,3,S,S]
    return {
        **ragged,
        "captions": [s["caption"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "keys": [s["key"] for s in samples],
        "epochs": [s["epoch"] for s in samples],
        "cursor": cursor,
        "errors": dict(errors.counts),
    }


def _split(flat: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """A flat ragged batch -> [3, H_i, W_i] views of it."""
    parts = torch.split(flat, [3 * h * w for h, w in sizes])
    return [part.view(3, h, w) for part, (h, w) in zip(parts, sizes, strict=True)]


def _unflatten(batch: dict) -> dict:
    """A collated ragged batch (flat pixels + pixel_sizes) -> pixel_values as a list of [3, H_i, W_i]."""
    if "pixel_sizes" not in batch:
        return batch
    sizes = batch.pop("pixel_sizes")
    batch["pixel_values"] = _split(batch["pixel_values"], sizes)
    return batch


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
        yield {"stream_error": str(exn), "outage": isinstance(exn, StorageOutage)}


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
                raise (StorageOutage if batch["outage"] else StreamError)(batch["stream_error"])
            yield _unflatten(batch)


def _as_cursor(cursor: Cursor | dict | None) -> Cursor:
    if cursor is None:
        return Cursor()
    return cursor if isinstance(cursor, Cursor) else Cursor.from_state_dict(cursor)


def _loader(dataset: ShardStream, num_workers: int, pin: bool = False) -> BatchLoader:
    # batch_size=None: batches are collated inside the worker, so a batch never mixes workers. No persistent
    # workers: the loader is iterated once (epochs roll over inside the workers), and a persistent DataLoader would
    # keep its iterator (and worker processes) alive after an error.
    # collate_fn: batches arrive collated; the default conversion would walk every batch's nested labels again.
    # pin: page-locked batches (on the current CUDA device's context), so that `.to(device, non_blocking=True)` is
    # an asynchronous DMA that overlaps the step instead of a blocking copy through a staging buffer.
    return BatchLoader(
        DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, collate_fn=_as_is,
                   pin_memory=pin)
    )


def _as_is(batch: dict) -> dict:
    return batch


def resolve_with_retry(spec: str | list[str], max_outage_s: float = DEFAULT_MAX_OUTAGE_S):
    """resolve_shards, retrying storage failures (not missing files) through an outage of up to ``max_outage_s``."""
    outage = Outage(max_outage_s)
    while True:
        try:
            found = resolve_shards(spec)
        except PERMANENT_OPEN_ERRORS:
            raise
        except Exception as exn:
            outage.failed(str(spec), exn)
            continue
        outage.ok()
        return found


def sample_counts(shards: list[str], counts: list[int] | None, outage: Outage) -> list[int]:
    """The manifest's counts, or (no manifest) each shard's samples, counted by reading it once."""
    if counts is not None:
        return counts
    log.warning(
        "no manifest with sample counts for %s…: counting by reading every shard once (write shards with "
        "launch/make_shards.py to get a manifest)",
        shards[0],
    )
    errors = ErrorCounter.unlimited()
    counted = count_each(shards, errors, outage)
    if errors.counts:
        log.warning("while counting: %s; those samples are left out of the order", dict(errors.counts))
    return counted


def count_each(shards: list[str], errors: ErrorCounter | None = None, outage: Outage | None = None) -> list[int]:
    """Each shard's readable samples, counted by reading it once (bad ones counted in ``errors``)."""
    errors = ErrorCounter.unlimited() if errors is None else errors
    return [sum(1 for _ in read_shard(url, errors, outage)) for url in shards]


def make_loader(
    cfg: StreamConfig,
    rank: int,
    world_size: int,
    cursor: Cursor | dict | None = None,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
) -> Iterable[dict]:
    """An infinite iterable of batches for ``rank`` of ``world_size``, continuing at ``cursor`` (a Cursor or its
    state) at any world size and number of data workers."""
    shards, counts = resolve_with_retry(cfg.shards, max_outage_s)
    counts = sample_counts(shards, counts, Outage(max_outage_s))
    if sum(counts) == 0:
        raise StreamError(f"the shards {shards[:4]}… hold no readable samples: they are empty or unreadable")
    order = GlobalOrder(shards, counts, cfg.seed, cfg.lanes, cfg.batch_size, cfg.resampled)
    identity = order_identity(cfg, counts)
    start = _as_cursor(cursor).start(order, identity)
    stream = ShardStream(cfg, shards, counts, rank, world_size, start, max_outage_s=max_outage_s,
                         order=(order, identity))
    return _loader(stream, cfg.num_workers, pin=torch.cuda.is_available())


def iterate_once(
    cfg: StreamConfig, rank: int = 0, world_size: int = 1, max_outage_s: float = DEFAULT_MAX_OUTAGE_S
) -> Iterator[dict]:
    """One pass over this rank's shards in order, no shuffling, eval transforms; finite.

    The last batch of each worker may be smaller and carries that worker's error counts for the whole pass. With
    several ranks, each sees ``shards[rank::world_size]`` (sample-interleaved when there are too few shards).
    """
    shards, counts = resolve_with_retry(cfg.shards, max_outage_s)
    cfg = dataclasses.replace(cfg, train=False, shuffle_buffer=0)
    dataset = ShardStream(cfg, shards, counts, rank, world_size, finite=True, max_outage_s=max_outage_s)
    yield from _loader(dataset, cfg.num_workers)


def read_captions(cfg: StreamConfig) -> list[str]:
    """Every caption of every readable sample, in shard order, as training sees them (lower-cased when
    ``cfg.lowercase``), and the instruction of each sample that carries one (instruction data); images are not
    decoded, bad samples are left out. For building a tokenizer."""
    shards, _ = resolve_shards(cfg.shards)
    errors = ErrorCounter.unlimited()
    captions: list[str] = []
    for url in shards:
        for raw in read_shard(url, errors):
            try:
                labels = parse_labels(raw)
                found = sample_captions(labels, raw)
            except _Skip:
                continue
            captions.extend(c.lower() if cfg.lowercase else c for c in found)
            if isinstance(labels.get("prompt"), str) and labels["prompt"]:
                captions.append(labels["prompt"])
    return captions


def count_samples(spec: str | list[str]) -> int:
    """Samples in a shard spec: from the manifest when there is one, else by reading every shard."""
    shards, counts = resolve_shards(spec)
    return sum(counts if counts is not None else count_each(shards))
