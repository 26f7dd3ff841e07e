"""Compare training runs of one MLflow experiment: a side-by-side table (the params that differ, the final value of
every metric, eval.* included) and a PNG of their curves.

    # the store of one run directory (training's default when MLFLOW_TRACKING_URI is unset)
    python launch/compare.py --experiment expblip-demo --tracking-uri sqlite:///runs/demo/stage2/mlflow.db
    # a tracking server (make mlflow): the finished runs at one learning rate, and the curves of another metric
    python launch/compare.py --experiment expblip --tracking-uri http://127.0.0.1:5000 \
        --filter "params.optim.lr = '0.0001' and attributes.status = 'FINISHED'" --metric samples_per_s --out sps.png
"""

from __future__ import annotations

import argparse
import sys

from expblip.eval.compare import CompareError, comparison_table, load_runs, plot_curves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--tracking-uri", default=None,
                        help="sqlite:///PATH/mlflow.db, a .db file or run directory, or http://HOST:PORT "
                             "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.optim.lr = '0.0001'\"")
    parser.add_argument("--metric", default="loss", help="metric whose curves are plotted (default: loss)")
    parser.add_argument("--out", default="compare.png", help="PNG of the curves (default: compare.png)")
    parser.add_argument("--max-runs", type=int, default=50, help="compare at most this many runs, oldest first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.experiment, args.tracking_uri, args.filter, args.metric, args.max_runs)
        print(comparison_table(runs, args.metric))
        path = plot_curves(runs, args.metric, args.out)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[expblip] {args.metric} curves of {len(runs)} run(s): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
