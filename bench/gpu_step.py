"""Stage 2 at the paper's full shape on one GPU, bf16: samples/s, MFU and peak GPU memory next to plan.py.

    python bench/gpu_step.py                                  # vitg-opt6.7b, micro-batch 16, OPT checkpointed
    python bench/gpu_step.py --micro-batch 32 --checkpointing lm qformer --steps 20
    python bench/gpu_step.py --peak-tflops 312                # a GPU the script does not know (A100: 312)

The bf16 policy of the paper recipes, on one device: frozen ViT-g and OPT-6.7B in bf16, compute in bf16 (autocast),
fp32 master weights and Adam states for the trained Q-Former, query tokens and projection (torch's fused AdamW).
Random weights at the real shape (no checkpoint needed), random 224-px pixels, 32 queries + BOS + --text-tokens
caption tokens. Needs PyTorch and transformers only: no DeepSpeed, Ray or MLflow, nothing downloaded; run it
from the repository root (PYTHONPATH=.) on a machine with nothing else installed.

MFU counts the FLOPs of the work the step must do, not what checkpointing recomputes: the frozen ViT's forward,
the Q-Former's forward and backward (3x forward) and the projection's, and the OPT's forward plus the backward of
its activations only (2x forward: its weights need no gradient). Linear/conv FLOPs are counted by hooks on one
forward; attention matmuls (4 s^2 h per layer, cross-attention 4 s_q s_kv h) are added from the shapes.

Without a CUDA device it prints why it skipped and exits 0: no figure here is ever a CPU figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vitg-opt6.7b")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=40, help="caption tokens after the queries and BOS")
    parser.add_argument("--checkpointing", nargs="*", default=["lm"], choices=["vision", "qformer", "lm"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (default: known)")
    return parser.parse_args(argv)


def build(preset: str, towers: tuple[str, ...], device: str = "cuda"):
    """The preset on the GPU: frozen towers bf16, trained parts fp32 (masters), random weights, checkpointing."""
    import torch

    from expblip.model.blip2 import CaptionModel, ModelConfig, apply_freezing, blip2_config, construct
    from expblip.model.blip2 import enable_checkpointing as checkpoint_towers
    from expblip.train.plan import OPT_VOCAB, _VocabOnly

    cfg = ModelConfig(preset=preset, tokenizer="-", frozen_dtype="bfloat16", dropout=0.0)
    config = blip2_config(cfg, _VocabOnly(OPT_VOCAB))
    with torch.device(device):
        model = construct(config, init=False, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    apply_freezing(model, cfg, "stage2", others_dtype=torch.float32)
    checkpoint_towers(model, towers)
    return CaptionModel(model).train(), config


def batch(config, micro: int, text: int, device: str = "cuda"):
    import torch

    q = config.num_query_tokens
    ids = torch.randint(3, min(50000, config.text_config.vocab_size - 2), (micro, q + 1 + text), device=device)
    ids[:, :q] = config.image_token_index
    ids[:, q] = 2  # </s> as BOS
    labels = ids.clone()
    labels[:, : q + 1] = -100
    pixels = torch.randn(micro, 3, config.vision_config.image_size, config.vision_config.image_size, device=device,
                         dtype=torch.bfloat16)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_flops(unit, inputs, config) -> dict[str, float]:
    """Model FLOPs of one step by tower: hooks count linear/conv FLOPs of one forward; attention from shapes."""
    import torch

    counts = {"vision_model": 0.0, "qformer": 0.0, "language_projection": 0.0, "language_model": 0.0}
    hooks = []
    for prefix in counts:
        for module in getattr(unit.blip2, prefix).modules() if prefix != "language_projection" else [
                unit.blip2.language_projection]:
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                hooks.append(module.register_forward_hook(_counter(counts, prefix)))
    with torch.no_grad(), torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16):
        unit(**inputs)
    for hook in hooks:
        hook.remove()
    b, v, q, t = inputs["input_ids"].shape[0], config.vision_config, config.qformer_config, config.text_config
    s_v = (v.image_size // v.patch_size) ** 2 + 1
    s_q, s_t = config.num_query_tokens, inputs["input_ids"].shape[1]
    counts["vision_model"] += b * v.num_hidden_layers * 4 * s_v**2 * v.hidden_size
    cross = q.num_hidden_layers // q.cross_attention_frequency
    counts["qformer"] += b * (q.num_hidden_layers * 4 * s_q**2 + cross * 4 * s_q * s_v) * q.hidden_size
    counts["language_model"] += b * t.num_hidden_layers * 4 * s_t**2 * t.hidden_size
    # what the step must compute: ViT forward; Q-Former and projection forward + backward; OPT forward + the
    # backward of its activations (no weight gradients)
    return {"vision_model": counts["vision_model"], "qformer": 3 * counts["qformer"],
            "language_projection": 3 * counts["language_projection"], "language_model": 2 * counts["language_model"]}


def _counter(counts: dict, prefix: str):
    import torch

    def hook(module, args, output) -> None:
        if isinstance(module, torch.nn.Linear):
            rows = args[0].numel() // module.in_features
            counts[prefix] += 2.0 * rows * module.in_features * module.out_features
        else:  # Conv2d (the patch embedding): 2 * output elements * kernel volume * input channels
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            counts[prefix] += 2.0 * output.numel() * kernel

    return hook


def peak_tflops(name: str, given: float) -> float:
    if given:
        return given
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    raise SystemExit(f"gpu_step: unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak in TFLOP/s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_step: skipped: no CUDA device (torch.cuda.is_available() is False); not measured on a GPU")
        return 0
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    towers = tuple(args.checkpointing)
    unit, config = build(args.preset, towers)
    optimizer = torch.optim.AdamW([p for p in unit.parameters() if p.requires_grad], lr=1e-5, fused=True)
    inputs = batch(config, args.micro_batch, args.text_tokens)
    flops = step_flops(unit, inputs, config)
    torch.cuda.reset_peak_memory_stats()
    seconds = _timed_steps(unit, optimizer, inputs, args.warmup, args.steps)
    _report(args, name, peak, flops, seconds, towers)
    return 0


def _timed_steps(unit, optimizer, inputs, warmup: int, steps: int) -> float:
    import torch

    def one() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = unit(**inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [one() for _ in range(warmup)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    print(f"losses (warm-up): {', '.join(f'{x:.4f}' for x in losses)}")
    return time.perf_counter() - start


def _report(args, name: str, peak: float, flops: dict, seconds: float, towers: tuple[str, ...]) -> None:
    import torch

    from expblip.train.plan import GiB, PlanConfig, make_plan

    total = sum(flops.values())
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    plan = make_plan(PlanConfig(preset=args.preset, gpus_per_node=1, micro_batch=args.micro_batch, gpu_gib=gpu_gib,
                                text_tokens=args.text_tokens, checkpointing=towers))
    predicted = plan.row("zero2").total_cfg_gpu / GiB  # one GPU: everything replicated
    used = torch.cuda.max_memory_allocated() / GiB
    print(f"{name}, {args.preset}, micro-batch {args.micro_batch}, {args.text_tokens} text tokens, checkpointing "
          f"{'+'.join(towers) or 'none'}, {args.steps} steps in {seconds:.2f} s")
    print("model TFLOP per step: " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops.items())
          + f"; total {total / 1e12:.2f}")
    print(f"samples/s: {args.micro_batch * args.steps / seconds:.1f}")
    print(f"MFU: {100 * total * args.steps / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s (target >= 40%)")
    print(f"peak GPU memory: {used:.1f} GiB allocated; plan.py {predicted:.1f} GiB; ratio {used / predicted:.2f} "
          "(target within 15%)")


if __name__ == "__main__":
    sys.exit(main())
