"""Train a stage under the `deepspeed` launcher (ZeRO-3 by default).

    # 2 CPU ranks, tiny model, synthetic shards made by launch/make_shards.py
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero3.json \
        --config recipes/tiny_stage2.yaml data.train.shards=demo/shards/train train.run_dir=runs/stage2
    # GPUs
    deepspeed --num_gpus 8 launch/finetune.py --deepspeed ds_configs/zero3.json --config recipes/paper_stage2.yaml
"""

from __future__ import annotations

import sys

from expblip.cli import config_parser, parse_config, run_main


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--deepspeed", help="DeepSpeed policy JSON (sets train.ds_config)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)

    def go() -> None:
        from expblip.train.loop import train

        cfg = parse_config(args, [f"train.ds_config={args.deepspeed}"] if args.deepspeed else [])
        train(cfg)

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
