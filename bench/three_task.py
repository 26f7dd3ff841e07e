"""A three-task tiny model over seeds: tests/test_tasks.py's chain on the demo's faces (CPU).

    python bench/three_task.py --out /tmp/three --seeds 3     # seeds 0..2, two trained at once (~25 min)
    python bench/three_task.py --out /tmp/three --steps-scale 0.5

tiny_vision (400 steps) -> tiny_lm (300) -> tiny_stage2 (900), every stage with the three-task mixture
(tasks.{describe,aus,emotion}.weight=1), each stage a world of one, on the demo's world (6000 training faces). The
export is asked each task on the 300 test faces (greedy, 30 new tokens) and each answer scored on its task's metric by
the strict evaluator: `aus` and `describe` on mean AU F1, `emotion` on strict emotion accuracy, each beside the best
constant answer chosen on the training labels. Nothing is chosen here (the steps are the test's, fixed before), so the
validation faces are not read. A seed varies every stage's initialisation and data order, never the faces. Per seed
and task: the paired 95 % interval of model − best constant (expblip.eval.paired: whole AU patterns resampled) and its
verdict; over seeds: mean ± SD. Also counted: AU answers of FACS names only, emotion answers naming none or several.
The last line: `ratio: <mean over seeds of the AU task's mean AU F1 / its best constant answer's>`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from chains import side_by_side, train_stages  # noqa: E402 - bench/chains.py, beside this script

STEPS = {"vision": 400, "lm": 300, "stage2": 900}  # tests/test_tasks.py's
THREE = ["tasks.describe.weight=1", "tasks.aus.weight=1", "tasks.emotion.weight=1"]
METRIC = {"describe": "mean_au_f1", "aus": "mean_au_f1", "emotion": "emotion_accuracy"}


def train(out: Path, shards: dict, scale: float, seed: int, times: dict) -> None:
    stages = [(out / "runs" / stage, recipe, STEPS[stage], THREE)
              for stage, recipe in (("vision", "tiny_vision"), ("lm", "tiny_lm"), ("stage2", "tiny_stage2"))]
    train_stages(stages, shards["train"], seed, times, f"seed{seed}", scale)


def answer_counts(results: dict) -> dict:
    """AU answers of FACS names only; emotion answers naming no emotion or several (of every test face)."""
    from expblip.data.facs import AUS

    names = {a.name for a in AUS.values()} | {"none"}
    aus = results["aus"]["items"]["captions"]
    confusion = results["emotion"]["model"]["emotion_confusion"]
    columns, matrix = confusion["columns"], confusion["matrix"]
    return {"faces": len(aus), "facs_only": sum({s.strip() for s in c.split(",")} <= names for c in aus),
            "emotion_none": sum(row[columns.index("none")] for row in matrix),
            "emotion_several": sum(row[columns.index("several")] for row in matrix)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/expblip-three-task")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (each in OUT/seedK)")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    from expblip.eval.evaluate import evaluate_tasks, training_text
    from expblip.eval.intervals import mean_sd
    from expblip.eval.paired import comparisons
    from expblip.model.generation import GenerationConfig
    from expblip.pipeline.demo import DemoConfig, make_shards

    out = Path(args.out)
    shards = make_shards(DemoConfig(out=str(out)))  # the same faces for every seed
    times: dict = {}
    side_by_side([functools.partial(train, out / f"seed{s}", shards, args.steps_scale, s, times)  # two seeds at once
                  for s in range(args.seeds)])
    print("seconds per stage:", {k: round(v) for k, v in times.items()}, flush=True)
    text = training_text(shards["train"])
    scores: dict = {task: {"model": [], "best": []} for task in METRIC}
    for seed in range(args.seeds):
        results = evaluate_tasks(out / f"seed{seed}" / "runs" / "stage2", shards["test"], train=text, batch_size=40,
                                 gen=GenerationConfig(num_beams=1, max_new_tokens=30), progress=False)
        for task, metric in METRIC.items():
            r = results[task]
            model, best = r["model"][metric], r["best"][metric]
            scores[task]["model"].append(model)
            scores[task]["best"].append(best["score"])
            row = comparisons({task: r}, task, {task: f"`{task}`"}, metrics=(metric,))[0]
            iv = row["interval"]
            print(f"seed {seed} `{task}` {metric}: {model:.3f} vs {best['score']:.3f} ({best.get('name', best['key'])})"
                  f"; model − best constant {iv['estimate']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}] "
                  f"({iv['units']} {iv['resampled']} of {iv['items']} faces): {row['verdict']}")
        print(f"seed {seed} answers: {answer_counts(results)}", flush=True)
    for task, metric in METRIC.items():
        print(f"`{task}` {metric} over {args.seeds} seed(s): {mean_sd(scores[task]['model'])} (best constant "
              f"{mean_sd(scores[task]['best'])})")
    au = scores["aus"]
    print(f"ratio: {sum(m / b for m, b in zip(au['model'], au['best'], strict=True)) / len(au['model']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
