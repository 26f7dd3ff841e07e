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
    args = config_parser(__doc__).parse_args(argv)

    def go() -> None:
        from expblip.train.ray_job import run

        result = run(parse_config(args))
        print(f"[expblip] finished: {result.metrics}")

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
