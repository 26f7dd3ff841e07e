"""Our training data loader against a bare WebDataset + PIL pipeline: same shards, same batch size, same process.

    python bench/data_throughput.py [--samples 8000] [--batch-size 32] [--workers 0] [--rounds 7] [--threads 1]
    python bench/data_throughput.py --workers 2          # both paths through a DataLoader with 2 worker processes

The script writes ``--samples`` synthetic 64-px faces as PNG into 4 shards in a temporary directory (the first
256 faces are drawn and then repeated under new keys, which keeps set-up short), then times both paths taking the
same number of full batches (samples // batch size) from the same shards:

"ours"  ``expblip.data.stream.make_loader(StreamConfig(train=True, ...), rank=0, world_size=1)``: fsspec open with
        retries → streaming tar reader → seeded 256-sample shuffle buffer → JSON labels + caption list (checked) →
        PNG decode with the decompression-bomb check → caption choice, random resized crop (bicubic, a real resample
        of a sub-box) and horizontal flip with left/right swapped in the caption, all seeded per (seed, epoch, key) →
        CLIP normalisation → batch of ``pixel_values`` [B, 3, 64, 64] + captions + labels + keys, with the resume
        cursor and the per-kind error counts.
"bare"  ``wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, repeat=True)`` → PIL decode of the PNG →
        RGB → bicubic resize to 64 (the faces are already 64 px, so PIL returns a copy here) → [0, 1] → CLIP
        normalisation → ``torch.stack`` into [B, 3, 64, 64]. No shuffle, no labels, no captions, no error handling.

Both run through a ``torch.utils.data.DataLoader(batch_size=None, num_workers=--workers)``, which is created anew
(and its workers started) in every timed round, for both. The order alternates between rounds (bare, ours; then
ours, bare; ...: bench/rounds.py) so machine noise hits both, and the reported figures are medians over the rounds.
``--threads`` sets torch's intra-op threads in this process (DataLoader workers always use one): on a few busy
cores, extra threads spin against each other and add noise. The last line is ``ratio: <ours/bare>`` (the median of
the rounds' samples/s ratios; target >= 0.9). It never asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import alternating, median, median_ratio  # noqa: E402 - bench/rounds.py, beside this script

IMAGE_SIZE = 64
NUM_SHARDS = 4
UNIQUE_FACES = 256  # drawn once, then repeated under new keys (drawing a face costs ~5 ms)


def make_shards(root: Path, samples: int) -> str:
    """``samples`` synthetic faces in ``NUM_SHARDS`` PNG shards under ``root``; returns the shard directory."""
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    faces = list(synthetic_records(min(samples, UNIQUE_FACES), seed=0, image_size=IMAGE_SIZE))
    records = ({**faces[i % len(faces)], "key": f"bench-{i:07d}"} for i in range(samples))
    out = root / "shards"
    write_shards(records, str(out), samples_per_shard=math.ceil(samples / NUM_SHARDS), progress=False)
    return str(out)


def ours_loader(shards: str, batch_size: int, workers: int) -> Iterable:
    from expblip.data.stream import StreamConfig, make_loader

    cfg = StreamConfig(shards=shards, batch_size=batch_size, num_workers=workers, train=True, image_size=IMAGE_SIZE)
    return make_loader(cfg, rank=0, world_size=1)


def bare_decode(sample: dict, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """PNG bytes → RGB → bicubic 64² → [0, 1] → (x - mean) / std as a float tensor [3, 64, 64]."""
    img = Image.open(io.BytesIO(sample["png"])).convert("RGB")
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std  # [64, 64, 3]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def bare_loader(urls: list[str], batch_size: int, workers: int) -> Iterable:
    import webdataset as wds
    from torch.utils.data import DataLoader

    from expblip.pixels import CLIP_MEAN, CLIP_STD

    decode = functools.partial(bare_decode, mean=np.asarray(CLIP_MEAN, np.float32), std=np.asarray(CLIP_STD, np.float32))
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, repeat=True)
        .map(decode)
        .batched(batch_size, collation_fn=torch.stack, partial=False)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def time_batches(make: Callable[[], Iterable], batches: int) -> float:
    """Seconds to build the loader and take ``batches`` batches from it (worker start-up included)."""
    start = time.perf_counter()
    it = iter(make())
    for _ in itertools.islice(it, batches):
        pass
    elapsed = time.perf_counter() - start
    del it  # shut the workers down outside the timed region
    return elapsed


def run(shards: str, batch_size: int, workers: int, rounds: int, samples: int) -> dict[str, list[float]]:
    """Seconds of each path in each of ``rounds`` alternating rounds (after one short warm-up of each)."""
    from expblip.data.shards import resolve_shards

    urls, _ = resolve_shards(shards)
    batches = samples // batch_size
    paths = {
        "bare": lambda: bare_loader(urls, batch_size, workers),
        "ours": lambda: ours_loader(shards, batch_size, workers),
    }
    for make in paths.values():
        time_batches(make, 1)  # warm-up: imports, first decode
    return alternating({name: (lambda make=make: time_batches(make, batches)) for name, make in paths.items()},
                       rounds)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (0: left alone) for the block, then restored (main() is called
    from tests, which must not inherit the setting)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8000,
                        help="samples per round (rounded down to full batches); shorter rounds are mostly noise")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes, for both paths")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in this process (0 = torch's)")
    args = parser.parse_args(argv)
    if args.samples < args.batch_size or min(args.batch_size, args.rounds) < 1 or args.workers < 0:
        parser.error("need --samples >= --batch-size >= 1, --rounds >= 1 and --workers >= 0")
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.samples)
        seconds = run(shards, args.batch_size, args.workers, args.rounds, args.samples)
    n = (args.samples // args.batch_size) * args.batch_size
    rates = {name: [n / s for s in values] for name, values in seconds.items()}
    print(f"bare WebDataset+PIL: {median(rates['bare']):.0f} samples/s   expblip loader: {median(rates['ours']):.0f} "
          f"samples/s   (medians of {args.rounds} alternating rounds of {n} samples, batch {args.batch_size}, "
          f"workers {args.workers})")
    print("per-round ratios: " + " ".join(f"{b / o:.3f}" for o, b in zip(seconds["ours"], seconds["bare"], strict=True)))
    print(f"ratio: {median_ratio(seconds, 'bare', 'ours'):.3f}", flush=True)  # rates: ours/bare = bare's time/ours
    return 0


if __name__ == "__main__":
    sys.exit(main())
