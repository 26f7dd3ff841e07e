"""Memory plan: will a preset train under ZeRO-2, ZeRO-3 or ZeRO-3 + CPU offload on these GPUs?

    # the paper's model on one node of 8 × 80 GB GPUs, Q-Former trains (paper step 2 default)
    python launch/plan.py --preset vitg-opt6.7b --gpus-per-node 8 --nodes 1
    # the released fine-tune config: ViT unfrozen too, 4 × 40 GB A100 as in the paper
    python launch/plan.py --preset vitg-opt6.7b --gpus-per-node 4 --gpu-gib 40 --trainable qformer+vit
    # CPU-only machine, the tiny debug preset; add DeepSpeed's own printouts
    DS_ACCELERATOR=cpu python launch/plan.py --preset tiny --gpus-per-node 2 --deepspeed-tables
    # the policy each paper recipe gets on 8 x 24 / 40 / 80 GB GPUs (precision, checkpointing, tower placement)
    python launch/plan.py --recipes
    # a modern LM with LoRA r 16 on it (adapters counted, trained and planned beside the Q-Former)
    python launch/plan.py --preset vitg-qwen2.5-7b --lora-r 16 --checkpointing lm
    # every preset: parameters, LoRA adapter counts, what a LoRA stage 2 trains and its GiB per GPU
    python launch/plan.py --presets

Prints parameter counts per tower (from the preset built on the meta device: no weights, no memory), DeepSpeed's
estimates (which assume every parameter trains) and ours (frozen towers hold only 16-bit weights; activations for
the micro-batch with and without activation checkpointing), and which strategies fit. The formulas are documented
in expblip/train/plan.py. Needs no GPU.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vitg-opt6.7b", help="model preset (BLIP-2's, or qwen2.5-vl-3b / -7b)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4, help="images per GPU per micro-step (default: 4)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    parser.add_argument("--trainable", choices=["qformer", "qformer+vit", "all"], default="qformer",
                        help="what trains besides the frozen LM: Q-Former (+ query tokens, projection; a native VLM's "
                             "merger), or also the ViT; all: full fine-tuning (every tower, the LM included)")
    parser.add_argument("--text-tokens", type=int, default=64, help="caption tokens (data.max_text_tokens)")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free")
    parser.add_argument("--checkpointing", nargs="*", default=[], choices=["vision", "qformer", "lm"],
                        help="towers with activation checkpointing (model.checkpointing)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank on --lora-towers (model.lora.r; 0 = none)")
    parser.add_argument("--lora-towers", nargs="*", default=["lm"], choices=["lm", "vision", "qformer"],
                        help="towers with LoRA adapters (model.lora.towers; default: lm)")
    parser.add_argument("--min-pixels", type=int, default=0, help="dynamic resolution (Qwen2.5-VL): model.min_pixels")
    parser.add_argument("--max-pixels", type=int, default=0,
                        help="dynamic resolution (Qwen2.5-VL): model.max_pixels; images are counted at this bound")
    parser.add_argument("--presets", action="store_true",
                        help="one line per preset: parameters, LoRA adapters (--lora-r, default 16) and GiB/GPU")
    parser.add_argument("--recipes", action="store_true",
                        help="print the policy of recipes/paper_stage{1,2}.yaml on 8 x 24 / 40 / 80 GB GPUs instead")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    parser.add_argument("--deepspeed-tables", action="store_true",
                        help="also print DeepSpeed's own estimate_zero{2,3}_model_states_mem_needs_all_cold tables")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.train.plan import (
        PlanConfig,
        format_plan,
        make_plan,
        plan_json,
        preset_table,
        print_deepspeed_tables,
        recipe_table,
    )

    if args.recipes:
        print("\n".join(recipe_table()))
        return 0
    if args.presets:
        print("\n".join(preset_table(args.lora_r or 16, args.gpus_per_node, args.gpu_gib, args.micro_batch)))
        return 0
    try:
        cfg = PlanConfig(preset=args.preset, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                         micro_batch=args.micro_batch, gpu_gib=args.gpu_gib, trainable=args.trainable,
                         text_tokens=args.text_tokens, headroom=args.headroom,
                         checkpointing=tuple(args.checkpointing), lora_r=args.lora_r,
                         lora_towers=tuple(args.lora_towers), min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        plan = make_plan(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan_json(plan) if args.json else format_plan(plan))
    if args.deepspeed_tables:
        print()
        print_deepspeed_tables(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
