"""Run a recipe chain end to end; stages whose outputs exist are skipped.

    python launch/pipeline.py --recipe demo                      # the synthetic-face demo (make demo)
    python launch/pipeline.py --recipe demo --stage2-steps 300   # a quicker, weaker demo
"""

from __future__ import annotations

import argparse
import sys

from expblip.cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo", choices=["demo"])
    parser.add_argument("--out", default="demo", help="directory for shards, runs, MLflow store and reports")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=1200)
    args = parser.parse_args(argv)

    def go() -> None:
        from expblip.pipeline.demo import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, train_samples=args.train_samples, lm_steps=args.lm_steps,
                            stage2_steps=args.stage2_steps))

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
