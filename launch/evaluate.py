"""Evaluate an exported Exp-BLIP model on held-out shards: captions → parsed AUs/emotions → F1 and accuracy.

    # CPU, 200 held-out synthetic faces, baseline caption from the training shards
    python launch/evaluate.py --model runs/stage2 --shards demo/shards/test --train-shards demo/shards/train \
        --out runs/stage2/eval --limit 200
    # GPU, the whole split, BP4D's 12 AUs
    python launch/evaluate.py --model runs/au_blip/export --shards s3://bucket/bp4d/test --aus bp4d \
        --device cuda --batch-size 64 --out runs/au_blip/eval

Prints the per-AU F1 table (model and constant-caption baseline: the most frequent training caption predicted for
every image) and ends with ``held-out mean AU F1: 0.612 (constant-caption baseline: 0.143)``. With --out it also
writes metrics.json and report.md there. A missing model directory or shard URL prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from expblip.data.facs import DATASET_AUS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("--shards", required=True, help="held-out shards: manifest URL/directory or brace pattern")
    parser.add_argument("--train-shards", help="training shards, for the constant-caption baseline (default: the "
                                               "most frequent held-out reference caption, an optimistic baseline)")
    parser.add_argument("--out", help="directory for metrics.json and report.md")
    parser.add_argument("--limit", type=int, help="evaluate only the first N held-out samples")
    parser.add_argument("--aus", default="synthetic", choices=sorted(DATASET_AUS), help="which dataset's AUs to score")
    parser.add_argument("--beams", type=int, default=5, help="beam width (default: 5, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned together")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.data.facs import DATASET_AUS
    from expblip.data.stream import StreamError
    from expblip.eval.evaluate import au_table, evaluate_export, summary_line, training_captions, write_report
    from expblip.model.blip2 import GenerationConfig
    from expblip.serve.captioner import resolve_export

    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    try:
        export = resolve_export(args.model)
        train = training_captions(args.train_shards) if args.train_shards else None
        result = evaluate_export(export, args.shards, DATASET_AUS[args.aus], gen, args.limit, train,
                                 args.batch_size, args.device, progress=not args.no_progress)
    except (OSError, ValueError, StreamError) as err:  # missing model / shards, unreadable data
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        print(f"report: {write_report(result, args.out) / 'report.md'}")
    print(au_table(result))
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
