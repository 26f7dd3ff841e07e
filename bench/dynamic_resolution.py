"""Dynamic resolution vs squeezing every image to a square, at one token budget: a tiny Qwen2.5-VL on faces in
photos of five shapes (CPU).

    python bench/dynamic_resolution.py --out /tmp/dynres --seeds 3    # both arms of a seed side by side (~45 min)
    python bench/dynamic_resolution.py --out /tmp/dynres --steps-scale 0.3

The world: the demo's faces (64 x 64 px; the same labels, seeds and splits), each pasted at a seeded place on a
canvas of one of five shapes (64x64, 96x64, 64x96, 112x64, 64x112 px, in turn; the background the face's own corner
colour), as a face sits in a photo. Both arms train the demo's Qwen2.5-VL chain (docs/models.md): tiny_vision with
model.preset=tiny-qwen2.5-vl (1000 steps), then tiny_qwen_vl (900 steps), each stage a world of one, and both read
at most 16 image tokens (64 x 64 px) per image:
    square   every image squeezed to 64 x 64 px: a face on a wide or tall canvas is distorted
    dynamic  model.min_pixels=256 model.max_pixels=4096: the aspect kept, scaled to fit the bound (96 x 64 -> 64 x 48
             px, 12 tokens; 112 x 64 -> 80 x 48, 15 tokens): the face keeps its shape but gets fewer pixels
Nothing is chosen here (the demo's budget, bounds fixed before), so the validation faces are not read. Each export is
scored once on the 300 test canvases (beam 3) beside the best constant caption of the training labels; per seed, the
paired 95 % interval of dynamic − square (expblip.eval.paired: whole AU patterns resampled) and its verdict; over
seeds, mean ± SD. A seed varies every stage's initialisation and data order, never the faces.
The last line: `ratio: <dynamic's mean AU F1 / square's, each the mean over seeds>`.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from chains import side_by_side, train_stages  # noqa: E402 - bench/chains.py, beside this script

SHAPES = [(64, 64), (96, 64), (64, 96), (112, 64), (64, 112)]  # (width, height) of the canvases, in turn
BOUNDS = ["model.min_pixels=256", "model.max_pixels=4096"]  # at most 64 x 64 px: the square arm's 16 tokens
ARMS = {"square": [], "dynamic": BOUNDS}
STEPS = {"vision": 1000, "stage2": 900}  # the demo's Qwen2.5-VL budget (docs/models.md)
SIZES = {"train": 6000, "val": 300, "test": 300}  # the demo's (expblip.pipeline.demo.DemoConfig)


def on_canvas(record: dict, index: int) -> dict:
    """The record with its face pasted at a seeded place on a canvas of SHAPES[index % 5]."""
    from PIL import Image

    face = record["image"]
    width, height = SHAPES[index % len(SHAPES)]
    canvas = Image.new("RGB", (width, height), face.getpixel((0, 0)))
    rng = random.Random(record["key"])
    canvas.paste(face, (rng.randrange(width - face.width + 1), rng.randrange(height - face.height + 1)))
    return {**record, "image": canvas}


def make_world(out: Path) -> dict[str, str]:
    """The demo's faces on canvases, as shards: {split: directory}."""
    from expblip.data.shards import MANIFEST, write_shards
    from expblip.data.synthetic import synthetic_records

    shards = {}
    for split, n in SIZES.items():
        path = out / "shards" / split
        if not (path / MANIFEST).is_file():
            records = (on_canvas(r, i) for i, r in enumerate(synthetic_records(n, seed=0, split=split)))
            write_shards(records, str(path), samples_per_shard=500, progress=False,
                         meta={"source": "synthetic on canvases", "split": split, "samples": n, "seed": 0})
        shards[split] = str(path)
    return shards


def train(arm: str, out: Path, shards: dict, scale: float, seed: int, times: dict) -> None:
    runs = out / f"seed{seed}" / arm
    stages = [(runs / "vision", "tiny_vision", STEPS["vision"], ["model.preset=tiny-qwen2.5-vl", *ARMS[arm]]),
              (runs / "stage2", "tiny_qwen_vl", STEPS["stage2"], ARMS[arm])]
    train_stages(stages, shards["train"], seed, times, f"seed{seed}.{arm}", scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/expblip-dynamic-resolution")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--beams", type=int, default=3)
    args = parser.parse_args(argv)
    from expblip.eval.evaluate import evaluate_export, training_text
    from expblip.eval.intervals import mean_sd, verdict
    from expblip.eval.paired import interval
    from expblip.model.generation import GenerationConfig

    out = Path(args.out)
    shards = make_world(out)
    times: dict = {}
    side_by_side([functools.partial(train, arm, out, shards, args.steps_scale, seed, times)
                  for seed in range(args.seeds) for arm in ARMS])  # a seed's two arms at once
    print("seconds per stage:", {k: round(v) for k, v in times.items()}, flush=True)
    text = training_text(shards["train"])
    f1: dict = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        results = {arm: evaluate_export(out / f"seed{seed}" / arm / "stage2", shards["test"], train=text,
                                        batch_size=32, gen=GenerationConfig(num_beams=args.beams), progress=False)
                   for arm in ARMS}
        for arm in ARMS:
            f1[arm].append(results[arm]["model"]["mean_au_f1"])
        best = results["square"]["best"]["mean_au_f1"]
        iv = interval("mean_au_f1", results["dynamic"], results["square"])
        print(f"seed {seed} test mean AU F1: square {f1['square'][-1]:.3f}, dynamic {f1['dynamic'][-1]:.3f} "
              f"(best constant caption {best['score']:.3f}: {best.get('name', best['key'])}); dynamic − square {iv}: "
              f"{verdict(iv)}", flush=True)
    print(f"test mean AU F1 over {args.seeds} seed(s): square {mean_sd(f1['square'])}, dynamic "
          f"{mean_sd(f1['dynamic'])}")
    square, dynamic = sum(f1["square"]) / args.seeds, sum(f1["dynamic"]) / args.seeds
    print(f"ratio: {dynamic / square:.3f}" if square else "ratio: nan (the square arm scored 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
