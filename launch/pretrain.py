"""Train a stage with Ray Train (TorchTrainer) driving DeepSpeed ZeRO-3 on every worker.

    # local Ray, 2 CPU workers
    python launch/pretrain.py --config recipes/tiny_stage2.yaml data.train.shards=demo/shards/train
    # a running cluster
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launch/pretrain.py --config recipes/tiny_stage2.yaml ray.num_workers=2
"""

from __future__ import annotations

import sys

from expblip.cli import config_parser, parse_config, run_main


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--verbose", action="store_true", help="show Ray's own console output (ray.verbose=true)")
    args = parser.parse_args(argv)

    def go() -> None:
        from expblip.log import get_logger
        from expblip.train.ray_job import run

        result = run(parse_config(args, ["ray.verbose=true"] if args.verbose else []))
        metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
        get_logger("launch").info(f"finished: {metrics}")

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
