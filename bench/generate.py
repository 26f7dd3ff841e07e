"""Our batched captioning against plain transformers on the same batches: same export, same decoding settings.

    python bench/generate.py [--images 64] [--batch-size 16] [--beams 5] [--max-new-tokens 30] [--rounds 5]
    python bench/generate.py --model demo/runs/tiny_stage2    # a trained export (RUN_DIR or RUN_DIR/export)

The export must be *trained*, so that its captions end with the caption end token as a real model's do (a random
model never emits it and every caption runs to ``--max-new-tokens``). ``--model`` names one; without it the demo's
``demo/runs/tiny_stage2`` is used when ``make demo`` has made it, else the script trains a small one first
(``launch/finetune.py``, one process, tiny stage 2 on 1200 synthetic faces, about 2 minutes) in a temporary directory.
The images are synthetic 64-px faces. Both sides decode with the same settings: ``--beams`` beams (or greedy with
``--beams 1``), ``--max-new-tokens``, the GenerationConfig default ``min_new_tokens``, the caption end token of
``expblip.json`` as EOS, float32:

"ours"        ``Captioner.from_export(export).caption(images, GenerationConfig(...), batch_size=--batch-size)``:
              PIL + numpy preprocessing of each batch, one ``generate`` per batch, batch decode of the new tokens.
"hf batched"  the baseline: what a user of plain transformers writes for the same batches. ``BlipImageProcessorPil``
              built from the export's ``expblip.json`` (size, mean, std, bicubic; the same pixels as ours),
              ``Blip2ForConditionalGeneration.from_pretrained(export)``, ``AutoTokenizer``, then per batch of
              ``--batch-size`` images: processor → ``model.generate(pixel_values=..., num_beams, max_new_tokens,
              min_new_tokens, eos_token_id=<caption_end_id>, pad_token_id)`` → ``batch_decode(skip_special_tokens)``.
"hf per image" (information only, ``--per-image``): the same HF code given one image per call.

Rounds alternate their order (hf batched, ours; ours, hf batched; ...: bench/rounds.py) after a warm-up of each;
the figures are medians over the rounds. Both sides run single-threaded in this process, so by default each is timed
by the process's CPU seconds (``--clock cpu``): the work itself, which other jobs on a shared machine move far less
than elapsed time (``--clock wall``; on an idle machine the two agree). The captions of both sides are compared string for string, with how many
ended before ``--max-new-tokens``; a mismatch makes the timing meaningless. ``--threads`` sets torch's intra-op
threads (default 1: on a few busy shared cores, more threads spin against each other). The last line is
``ratio: <ours/hf batched>`` (the median of the rounds' captions/s ratios; target >= 1.0). It never asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import alternating, median, median_ratio  # noqa: E402 - bench/rounds.py, beside this script

DEMO_EXPORT = REPO / "demo" / "runs" / "tiny_stage2"


def train_export(root: Path, steps: int = 500) -> Path:
    """A small trained tiny export under ``root``: stage 2 (ViT, Q-Former, projection and the 2-layer OPT train)
    from random towers on 1200 synthetic faces, in one process (``launch/finetune.py``, a world of one)."""
    import subprocess

    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    write_shards(synthetic_records(1200, seed=0), str(root / "train"), samples_per_shard=600, progress=False)
    overrides = [f"data.train.shards={root / 'train'}", f"train.run_dir={root / 'run'}", f"train.max_steps={steps}",
                 "model.weights=", "train.log_every=100", "tracking.enabled=false", "train.ckpt_every=0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "launch/finetune.py", "--config", "recipes/tiny_stage2.yaml", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training the bench's export failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return root / "run" / "export"


class PlainHF:
    """The export used with transformers alone: processor, model and tokenizer loaded from the directory."""

    def __init__(self, export: Path, beams: int, max_new_tokens: int, min_new_tokens: int) -> None:
        from PIL import Image
        from transformers import AutoTokenizer, Blip2ForConditionalGeneration, BlipImageProcessorPil

        meta = json.loads((export / "expblip.json").read_text())
        size = {"height": meta["image_size"], "width": meta["image_size"]}
        self.processor = BlipImageProcessorPil(size=size, image_mean=meta["mean"], image_std=meta["std"],
                                               resample=Image.Resampling.BICUBIC, do_convert_rgb=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(str(export), local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
        self.kwargs = dict(num_beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                           eos_token_id=meta["caption_end_id"], pad_token_id=self.tokenizer.pad_token_id)
        self.prompt = self.model.config.num_query_tokens + 1  # generate() returns the image prompt first
        self.ended: list[bool] = []  # of the last batched() call: did each caption end with the end token

    def caption(self, images: Sequence) -> list[str]:
        """Captions of ``images`` from one processor call and one generate call."""
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.generate(pixel_values=pixel_values, **self.kwargs)  # the image prompt, then new tokens
        self.ended += (out[:, self.prompt :] == self.kwargs["eos_token_id"]).any(dim=1).tolist()
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def batched(self, images: Sequence, batch_size: int) -> list[str]:
        self.ended = []
        return [c for i in range(0, len(images), batch_size) for c in self.caption(images[i : i + batch_size])]


def run(export: Path, images: list, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """(seconds per round, captions) of each path over ``args.rounds`` alternating rounds."""
    from expblip.infer.captioner import Captioner
    from expblip.model.generation import GenerationConfig

    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    ours = Captioner.from_export(export)
    hf = PlainHF(export, args.beams, args.max_new_tokens, gen.min_new_tokens)
    work = {"hf batched": lambda imgs: hf.batched(imgs, args.batch_size),
            "ours": lambda imgs: ours.caption(imgs, gen, batch_size=args.batch_size)}
    if args.per_image:
        work["hf per image"] = lambda imgs: hf.batched(imgs, 1)
    captions: dict[str, list[str]] = {}

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(name: str) -> float:
        start = clock()
        captions[name] = work[name](images)
        return clock() - start

    for fn in work.values():
        fn(images[: args.batch_size])  # warm-up
    seconds = alternating({name: (lambda name=name: timed(name)) for name in work}, args.rounds)
    work["hf batched"](images)  # once more, so that hf.ended describes these images with the batch size
    captions["ended"] = hf.ended
    return seconds, captions


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (0: left alone) for the block, then restored (main() is called
    from tests, which must not inherit the setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="ours (and hf batched): images per generate")
    parser.add_argument("--beams", type=int, default=5, help="beam width (1 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="a trained export (RUN_DIR or RUN_DIR/export); default: the demo's, else one "
                                        "trained here first")
    parser.add_argument("--train-steps", type=int, default=500, help="steps of the export trained without --model")
    parser.add_argument("--per-image", action="store_true", help="also time HF with one image per call (info)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: this process's CPU seconds (default; with --threads 1 the work itself, barely moved "
                             "by other jobs on a shared machine); wall: elapsed seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU seconds of several threads are not elapsed time)")
    if min(args.images, args.batch_size, args.beams, args.max_new_tokens, args.rounds) < 1:
        parser.error("--images, --batch-size, --beams, --max-new-tokens and --rounds must be >= 1")
    return args


def _given_export(model: str | None) -> Path | None:
    from expblip.infer.captioner import resolve_export

    if model:
        return resolve_export(model)
    return resolve_export(DEMO_EXPORT) if (DEMO_EXPORT / "export" / "config.json").is_file() else None


@contextlib.contextmanager
def bench_export(model: str | None, threads: int, train_steps: int = 500) -> Iterator[Path]:
    """The export a bench times (--model, else the demo's, else one trained in a temporary directory), with torch
    at `threads` intra-op threads. Raises SystemExit(2) naming --model when it names no export."""
    try:
        given = _given_export(model)
    except FileNotFoundError as err:
        print(f"error: --model {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        yield given or train_export(Path(tmp), train_steps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.data.synthetic import synthetic_records

    images = [r["image"] for r in synthetic_records(args.images, seed=7, split="test")]
    try:
        with bench_export(args.model, args.threads, args.train_steps) as export:
            seconds, captions = run(export, images, args)
    except SystemExit as exit_:
        return int(exit_.code)
    n, limit = len(images), args.max_new_tokens
    rates = {name: median([n / s for s in values]) for name, values in seconds.items()}
    matched = sum(a == b for a, b in zip(captions["ours"], captions["hf batched"], strict=True))
    print(f"hf batched: {rates['hf batched']:.1f} captions/s   expblip: {rates['ours']:.1f} captions/s"
          + (f"   hf per image (info): {rates['hf per image']:.1f} captions/s" if "hf per image" in rates else "")
          + f"   (medians of {args.rounds} alternating rounds of {n} images, {args.clock} clock, batch "
          f"{args.batch_size}, {args.beams} beams, {limit} new tokens max, export {export})")
    ended = sum(captions["ended"])
    print(f"captions matching hf batched: {matched}/{n}   ended before the token limit: {ended}/{n}")
    print(f"example caption: {captions['ours'][0]!r}")
    print("per-round ratios: " + " ".join(f"{h / o:.3f}" for o, h in zip(seconds["ours"], seconds["hf batched"],
                                                                        strict=True)))
    print(f"ratio: {median_ratio(seconds, 'hf batched', 'ours'):.3f}", flush=True)  # captions/s: ours/hf = hf's time/ours
    return 0


if __name__ == "__main__":
    sys.exit(main())
