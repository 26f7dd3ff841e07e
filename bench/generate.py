"""Our batched captioning against plain transformers generating one image at a time: same export, same settings.

    python bench/generate.py [--images 64] [--batch-size 16] [--beams 5] [--max-new-tokens 30] [--rounds 2]
    python bench/generate.py --model runs/tiny_stage2      # a trained export (RUN_DIR or RUN_DIR/export)

Without ``--model`` the script builds a tiny random BLIP-2 (as tests/test_captioner.py does: a byte-level BPE
tokenizer trained on a few synthetic captions, ``build_model(ModelConfig())``, ``export_hf``) in a temporary
directory. The images are synthetic 64-px faces. Three paths caption the same images with the same decoding
settings (``--beams`` beams, or greedy with ``--beams 1``; ``--max-new-tokens``; the GenerationConfig default
``min_new_tokens``; the caption-end token of ``expblip.json`` as EOS):

"ours"        ``Captioner.from_export(export).caption(images, GenerationConfig(...), batch_size=--batch-size)``:
              PIL + numpy preprocessing of each batch, one ``generate`` per batch, batch decode.
"hf"          the baseline: what a user of plain transformers writes per image. ``BlipImageProcessorPil`` built from
              the export's ``expblip.json`` (size, mean, std, bicubic; it gives the same pixels as ours),
              ``Blip2ForConditionalGeneration.from_pretrained(export)``, ``AutoTokenizer``, then for each image:
              processor → ``model.generate(pixel_values=..., num_beams=..., max_new_tokens=..., min_new_tokens=...,
              eos_token_id=<caption_end_id>, pad_token_id=...)`` → ``tokenizer.decode(skip_special_tokens=True)``.
              The comparison is our batched path against per-image HF generate: the way the model would be served
              without expblip.
"hf batched"  informational: the same HF code given ``--batch-size`` images per processor and generate call.

Rounds alternate hf / ours / hf batched (after a short warm-up of each) so machine noise hits all three. The
captions of ours and of each HF path are compared string for string and the number that match is printed; a
mismatch makes the timing comparison meaningless. ``--threads`` sets torch's intra-op threads (default 1: on a
few busy shared cores, more threads spin against each other and made the tiny model ~8x slower). The last line
is ``ratio: <ours/hf>`` (captions/s against the per-image baseline; target >= 1.0). It never asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_export(root: Path) -> Path:
    """A tiny random BLIP-2 export under ``root`` (tokenizer trained on synthetic captions), as the tests build."""
    import torch

    from expblip.data.synthetic import synthetic_records
    from expblip.model.blip2 import ModelConfig, build_model
    from expblip.model.tokenizer import train_caption_tokenizer
    from expblip.model.weights import export_hf

    captions = [c for r in synthetic_records(40, seed=1) for c in r["captions"]]
    tokenizer = train_caption_tokenizer(captions, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), tokenizer)
    return export_hf(model.state_dict(), model.config, tokenizer, root / "export")


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

    def caption(self, images: Sequence) -> list[str]:
        """Captions of ``images`` from one processor call and one generate call."""
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.generate(pixel_values=pixel_values, **self.kwargs)  # the image prompt, then new tokens
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def per_image(self, images: Sequence) -> list[str]:
        return [self.caption([image])[0] for image in images]

    def batched(self, images: Sequence, batch_size: int) -> list[str]:
        return [c for i in range(0, len(images), batch_size) for c in self.caption(images[i : i + batch_size])]


def timed(fn: Callable[[], list[str]]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    captions = fn()
    return time.perf_counter() - start, captions


def run(export: Path, images: list, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(captions/s, captions) of each path over ``args.rounds`` alternating rounds."""
    from expblip.infer.captioner import Captioner
    from expblip.model.blip2 import GenerationConfig

    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    ours = Captioner.from_export(export)
    hf = PlainHF(export, args.beams, args.max_new_tokens, gen.min_new_tokens)
    paths = {
        "hf": lambda imgs: hf.per_image(imgs),
        "ours": lambda imgs: ours.caption(imgs, gen, batch_size=args.batch_size),
        "hf batched": lambda imgs: hf.batched(imgs, args.batch_size),
    }
    for fn in paths.values():
        fn(images[:2])  # warm-up
    seconds, captions = dict.fromkeys(paths, 0.0), {}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            elapsed, captions[name] = timed(lambda fn=fn: fn(images))
            seconds[name] += elapsed
    return {name: args.rounds * len(images) / s for name, s in seconds.items()}, captions


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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="an export (RUN_DIR or RUN_DIR/export); default: a tiny random one")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.beams, args.max_new_tokens, args.rounds) < 1:
        parser.error("--images, --batch-size, --beams, --max-new-tokens and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.data.synthetic import synthetic_records
    from expblip.infer.captioner import resolve_export

    try:
        given = resolve_export(args.model) if args.model else None
    except FileNotFoundError as err:
        print(f"error: --model {err}", file=sys.stderr)
        return 2
    images = [r["image"] for r in synthetic_records(args.images, seed=7)]
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        export = given or make_export(Path(tmp))
        rates, captions = run(export, images, args)
    n = len(images)
    matched = {name: sum(a == b for a, b in zip(captions["ours"], captions[name], strict=True)) for name in rates}
    print(f"hf per-image: {rates['hf']:.1f} captions/s   expblip batched: {rates['ours']:.1f} captions/s   "
          f"hf batched (info): {rates['hf batched']:.1f} captions/s   ({n} images x {args.rounds} rounds, "
          f"batch {args.batch_size}, {args.beams} beams, {args.max_new_tokens} new tokens max)")
    print(f"captions matching hf per-image: {matched['hf']}/{n}   matching hf batched: {matched['hf batched']}/{n}")
    print(f"example caption: {captions['ours'][0]!r}")
    print(f"ratio: {rates['ours'] / rates['hf']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
