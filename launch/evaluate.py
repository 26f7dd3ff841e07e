"""Evaluate an exported Exp-BLIP model on held-out shards: captions → parsed AUs/emotions → F1 and accuracy beside
every baseline that costs nothing, caption text metrics, optional linear probes, a report, and MLflow.

    # CPU, a quick look at a seeded random 200 held-out synthetic faces, baselines chosen on the training shards,
    # no METEOR JVM
    python launch/evaluate.py --model runs/stage2 --shards demo/shards/test --train-shards demo/shards/train \
        --out runs/stage2/eval --limit 200 --no-meteor
    # + linear probes on the Q-Former and the ViT features, report attached to the training run's MLflow run
    python launch/evaluate.py --model runs/stage2 --shards demo/shards/test --train-shards demo/shards/train \
        --out runs/stage2/eval --probe qformer --probe vit --probe-train-shards demo/shards/train --mlflow
    # GPU, the whole split, BP4D's 12 AUs (the manifest's dataset: no --aus needed; a contradicting one is refused)
    python launch/evaluate.py --model runs/au_blip/export --shards s3://bucket/bp4d/test \
        --device cuda --batch-size 64 --out runs/au_blip/eval
    # the field's protocol: one export per subject-exclusive fold ({fold} = 1, 2, 3; shards from
    # make_shards.py bp4d ... --fold K --folds 3), per-AU F1 per fold and the mean, beside ME-GraphAU and the paper;
    # each fold's manifests are checked first (dataset, split, fold, every test frame), the test split is never cut
    python launch/evaluate.py --protocol bp4d-3fold --model runs/bp4d_fold{fold} \
        --shards shards/bp4d/fold{fold}/test --train-shards shards/bp4d/fold{fold}/train \
        --probe qformer --probe-train-shards shards/bp4d/fold{fold}/train --out runs/bp4d_protocol

A task-prompted model (config `tasks`) is asked each task it was trained on, with that task's prompt, and each answer
set is scored on its task's metric beside the baselines (a table of tasks, and one verdict line per task).
Prints the model beside each baseline (the most frequent training caption, the best constant caption for AU F1 and
for emotion accuracy chosen on the training labels, chance), the per-AU F1 table, the caption metrics and the
probes, and ends with the verdict lines, e.g. ``held-out mean AU F1: 0.861 (best constant caption: 0.412)``.
Emotion accuracy is strict: a caption is right only when the emotions it names equal the true set. With --out it
writes metrics.json, report.md and PNG plots there. --mlflow logs eval.* metrics and the report into the training
run named by RUN_DIR/mlflow_run.json, or into a new run at --mlflow-uri. A missing model directory or shard URL
prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None):
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.job import EvalJob

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("--shards", required=True, help="held-out shards: manifest URL/directory or brace pattern")
    parser.add_argument("--train-shards", default="", help="training shards, on whose labels and captions the "
                        "baselines are chosen (default: the held-out ones, an optimistic choice)")
    parser.add_argument("--out", default="", help="directory for metrics.json, report.md and the plots")
    parser.add_argument("--limit", type=int, help="a quick look: caption a seeded random N of the held-out samples, "
                        "drawn across the whole split (never the first N, which are whole subjects), as the report "
                        "says at its top; refused with --protocol, which scores the whole test split")
    parser.add_argument("--aus", default="", choices=sorted(DATASET_AUS),
                        help="which dataset's AUs to score (default: the held-out shards' dataset, from their "
                        "manifest; synthetic when it names none); refused when it contradicts the manifest")
    parser.add_argument("--beams", type=int, default=5, help="beam width (default: 5, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned together")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="weights and compute dtype of the model (bf16 halves memory; the Q-Former stays fp32)")
    parser.add_argument("--task", default="", choices=["", "describe", "aus", "emotion"],
                        help="ask only this task (default: every task the model was trained on, each scored on its "
                        "metric: AU F1 for aus, emotion accuracy for emotion, both for describe)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--protocol", default="", choices=["", "bp4d-3fold", "disfa-3fold"],
                        help="evaluate one export per fold ({fold} in --model and the shard paths) on the dataset's "
                        "AUs; prints per-AU F1 per fold and the mean beside the field's reference numbers")
    text = parser.add_argument_group("caption text metrics")
    text.add_argument("--caption-metrics", action=argparse.BooleanOptionalAction, default=True,
                      help="score the captions as text against every reference caption (default: on)")
    text.add_argument("--no-meteor", dest="meteor", action="store_false",
                      help="skip METEOR (saves its ~7 s Java start)")
    probe = parser.add_argument_group("linear probes")
    probe.add_argument("--probe", action="append", choices=["vit", "qformer"], default=[],
                       help="train a linear probe on these frozen features (repeatable); tested on --shards")
    probe.add_argument("--probe-train-shards", default="", help="shards the probes train on (required with --probe)")
    probe.add_argument("--probe-task", default="both", choices=["au", "emotion", "both"],
                       help="what the probes predict")
    probe.add_argument("--probe-pooling", default="mean", choices=["mean", "concat"],
                       help="Q-Former query outputs: mean over the queries or concatenated")
    probe.add_argument("--probe-limit", type=int, help="train the probes on only the first N samples of "
                       "--probe-train-shards; the test split is always whole")
    track = parser.add_argument_group("MLflow")
    track.add_argument("--mlflow", action="store_true", help="log eval.* metrics and the report to MLflow: into the "
                                                             "training run of --model when it has mlflow_run.json")
    track.add_argument("--mlflow-uri", default="", help="tracking URI for a new run when --model has no "
                                                        "mlflow_run.json (default: $MLFLOW_TRACKING_URI)")
    track.add_argument("--mlflow-experiment", default="expblip-eval", help="experiment of a new run")
    try:
        job = EvalJob(**vars(parser.parse_args(argv)))
        if job.protocol:
            from expblip.eval.protocol import check_job

            check_job(job)
        return job
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    from expblip.data.stream import StreamError
    from expblip.eval.job import run_job

    try:
        run_job(job)
    except (OSError, ValueError, StreamError) as err:  # missing model / shards, unreadable data, no MLflow target
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
