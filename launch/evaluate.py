"""Evaluate an exported Exp-BLIP model on held-out shards: captions → parsed AUs/emotions → F1 and accuracy, caption
text metrics, optional linear probes, a report, and MLflow.

    # CPU, 200 held-out synthetic faces, baseline caption from the training shards, no METEOR JVM
    python launch/evaluate.py --model runs/stage2 --shards demo/shards/test --train-shards demo/shards/train \
        --out runs/stage2/eval --limit 200 --no-meteor
    # + linear probes on the Q-Former and the ViT features, report attached to the training run's MLflow run
    python launch/evaluate.py --model runs/stage2 --shards demo/shards/test --train-shards demo/shards/train \
        --out runs/stage2/eval --probe qformer --probe vit --probe-train-shards demo/shards/train --mlflow
    # GPU, the whole split, BP4D's 12 AUs
    python launch/evaluate.py --model runs/au_blip/export --shards s3://bucket/bp4d/test --aus bp4d \
        --device cuda --batch-size 64 --out runs/au_blip/eval

Prints the per-AU F1 table (model and constant-caption baseline: the most frequent training caption predicted for
every image), the caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr as COCO computes them, plus METEOR, ROUGE-L
and MiniLM embedding similarity best over each image's references, as the paper) and the probes, and ends with
``held-out mean AU F1: 0.612 (constant-caption baseline: 0.143)``. With --out it writes metrics.json, report.md and
PNG plots there. --mlflow logs eval.* metrics and the report into the training run named by RUN_DIR/mlflow_run.json,
or into a new run at --mlflow-uri. A missing model directory or shard URL prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from expblip.data.facs import DATASET_AUS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("--shards", required=True, help="held-out shards: manifest URL/directory or brace pattern")
    parser.add_argument("--train-shards", help="training shards, for the constant-caption baseline (default: the "
                                               "most frequent held-out reference caption, an optimistic baseline)")
    parser.add_argument("--out", help="directory for metrics.json, report.md and the plots")
    parser.add_argument("--limit", type=int, help="evaluate only the first N held-out samples")
    parser.add_argument("--aus", default="synthetic", choices=sorted(DATASET_AUS), help="which dataset's AUs to score")
    parser.add_argument("--beams", type=int, default=5, help="beam width (default: 5, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned together")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    text = parser.add_argument_group("caption text metrics")
    text.add_argument("--caption-metrics", action=argparse.BooleanOptionalAction, default=True,
                      help="score the captions as text against every reference caption (default: on)")
    text.add_argument("--no-meteor", dest="meteor", action="store_false",
                      help="skip METEOR (saves its ~7 s Java start)")
    probe = parser.add_argument_group("linear probes")
    probe.add_argument("--probe", action="append", choices=["vit", "qformer"], default=[],
                       help="train a linear probe on these frozen features (repeatable); tested on --shards")
    probe.add_argument("--probe-train-shards", help="shards the probes train on (required with --probe)")
    probe.add_argument("--probe-task", default="both", choices=["au", "emotion", "both"],
                       help="what the probes predict")
    probe.add_argument("--probe-pooling", default="mean", choices=["mean", "concat"],
                       help="Q-Former query outputs: mean over the queries or concatenated")
    probe.add_argument("--probe-limit", type=int, help="use only the first N samples of each probe split")
    track = parser.add_argument_group("MLflow")
    track.add_argument("--mlflow", action="store_true", help="log eval.* metrics and the report to MLflow: into the "
                                                             "training run of --model when it has mlflow_run.json")
    track.add_argument("--mlflow-uri", help="tracking URI for a new run when --model has no mlflow_run.json "
                                            "(default: $MLFLOW_TRACKING_URI)")
    track.add_argument("--mlflow-experiment", default="expblip-eval", help="experiment of a new run")
    args = parser.parse_args(argv)
    if args.probe and not args.probe_train_shards:
        parser.error("--probe needs --probe-train-shards (the shards the linear layer trains on)")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """The evaluation (and probes) that the arguments ask for."""
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.evaluate import evaluate_export, training_captions
    from expblip.eval.probe import run_probes
    from expblip.model.blip2 import GenerationConfig
    from expblip.serve.captioner import resolve_export

    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    export = resolve_export(args.model)
    train = training_captions(args.train_shards) if args.train_shards else None
    result = evaluate_export(export, args.shards, DATASET_AUS[args.aus], gen, args.limit, train, args.batch_size,
                             args.device, progress=not args.no_progress, caption_metrics=args.caption_metrics,
                             meteor=args.meteor)
    tasks = ("au", "emotion") if args.probe_task == "both" else (args.probe_task,)
    probes = [p for features in dict.fromkeys(args.probe)
              for p in run_probes(export, args.probe_train_shards, args.shards, features, tasks, DATASET_AUS[args.aus],
                                  args.probe_pooling, batch_size=args.batch_size, limit=args.probe_limit,
                                  device=args.device, progress=not args.no_progress, skip_unlabelled=True)]
    if probes:
        result["probes"] = probes
    return result


def log_mlflow(args: argparse.Namespace, result: dict, out: str) -> str:
    """Into the training run of --model when it recorded one, else a new run at --mlflow-uri."""
    from expblip.eval.report import find_mlflow_run, log_to_mlflow

    target = find_mlflow_run(args.model)
    if target:
        return log_to_mlflow(result, out, target["tracking_uri"], target["run_id"])
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"{args.model} has no mlflow_run.json (not a training run directory); pass --mlflow-uri "
                         "or set MLFLOW_TRACKING_URI for a new evaluation run")
    return log_to_mlflow(result, out, uri, experiment=args.mlflow_experiment)


def report(args: argparse.Namespace, result: dict) -> None:
    """Files, MLflow and the printed tables; the summary line comes last."""
    from expblip.eval.report import au_table, caption_table, probe_table, summary_line, write_report

    with tempfile.TemporaryDirectory(prefix="expblip-eval-") as scratch:
        out = args.out or scratch  # MLflow needs the files even without --out
        if args.out or args.mlflow:
            path = write_report(result, out)
            if args.out:
                print(f"report: {path / 'report.md'}")
        if args.mlflow:
            print(f"mlflow run: {log_mlflow(args, result, out)}")
    print(au_table(result))
    if result.get("captions"):
        print(caption_table(result))
    if result.get("probes"):
        print(probe_table(result["probes"]))
    print(summary_line(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.data.stream import StreamError

    try:
        result = evaluate(args)
        report(args, result)
    except (OSError, ValueError, StreamError) as err:  # missing model / shards, unreadable data, no MLflow target
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
