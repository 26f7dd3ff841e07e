"""The first GPU run, through the real entry points, on one GPU in under 8 minutes (twice fits in 15).

    python bench/gpu_smoke.py                        # a machine with one CUDA GPU (H100/H200)
    python bench/gpu_smoke.py --wheels wheels/       # first installs the wheels there (the machine has no index)
    DS_ACCELERATOR=cpu python bench/gpu_smoke.py --dry-run   # the same code paths, tiny, on CPU ranks (gloo)

1. **The loop under the deepspeed launcher**: `deepspeed --num_gpus 1 launch/finetune.py --deepspeed
   ds_configs/zero3.json` (the command users type; bf16 on the GPU), tiny stage 2 on shards written here, 20 steps
   with a held-out evaluation and a checkpoint every 10, stopped at 10 and resumed. Prints the loss falling, the
   resumed step, and the trainable-weight digests at the save and at the resume (equal: the resume is exact).
2. **The paper's shape through the same loop**: vitg-opt6.7b stage 2 with recipes/paper_stage2.yaml (bf16,
   micro-batch 32, the placement and activation checkpointing that expblip.train.plan picks on this GPU), random
   weights written with transformers' save_pretrained on this machine's disk and streamed in as model.weights, the
   data 640x480 JPEG faces through the loader. `loop.setup` and `loop.step`, timed: samples/s; MFU (frozen ViT
   forward, Q-Former forward + backward, OPT forward + activation backward; recomputation not counted, counted as
   bench/gpu_step.py counts); peak GPU memory beside plan.py's figure; the share of a step the GPU sits idle (a
   torch.profiler window: 1 - union of kernel time / wall time).
3. **The loader at a real image size**: the same 640x480 JPEGs, random-resized-cropped to 224 by one data worker:
   samples/s per worker, and from part 2's step rate, the workers an 8-GPU node needs.

Targets (issue 20): the tiny run trains, evaluates, stops and resumes exactly; MFU >= 40 % with the GPU idle < 5 %
of the step; peak memory within 15 % of plan.py; <= 2 loader workers per GPU. --dry-run runs every part on the CPU
(tiny presets, gloo, DS_ACCELERATOR=cpu) and prints its figures as CPU figures, never as GPU ones.

The machine needs PyTorch, transformers, DeepSpeed, webdataset and their dependencies; no Ray, MLflow or S3.
Wheels for what is missing (DeepSpeed is pure Python) can travel with the checkout:
    pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \\
        deepspeed==0.19.8 hjson py-cpuinfo msgpack einops ninja webdataset==1.0.2 braceexpand nvidia-ml-py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
NEEDED = ("deepspeed", "webdataset", "transformers", "yaml", "PIL", "fsspec")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny presets on CPU ranks (gloo): the same code paths")
    p.add_argument("--root", default="", help="working directory (default: a temporary one, deleted at the end)")
    p.add_argument("--wheels", default="", help="install these wheels first (pip --no-index --no-deps)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run")
    p.add_argument("--micro-batch", type=int, default=32, help="part 2: images per GPU per step")
    p.add_argument("--steps", type=int, default=8, help="part 2: timed steps (after 3 warm-up steps)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (default: known GPUs)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: part 2 in a process of its own
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        return _measure(json.loads(args.measure))
    if args.wheels:
        _install(args.wheels)
    missing = [m for m in NEEDED if not _importable(m)]
    if missing:
        raise SystemExit(f"gpu_smoke: missing {missing}: pass --wheels DIR with their wheels (see --help)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: skipped: no CUDA device (torch.cuda.is_available() is False); not measured on a GPU. "
              "--dry-run runs the same code paths on the CPU")
        return 0
    root = Path(args.root or tempfile.mkdtemp(prefix="gpu-smoke-"))
    root.mkdir(parents=True, exist_ok=True)
    parts = {int(p) for p in args.parts.split(",")}
    where = "CPU dry run (tiny, gloo): not GPU figures" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"gpu_smoke on {where}; torch {torch.__version__}; work in {root}", flush=True)
    results: dict = {}
    try:
        if 1 in parts:
            results["tiny"] = part_tiny(root, args.dry_run)
        if 2 in parts or 3 in parts:
            _write_jpeg_shards(root / "jpeg", 64 if args.dry_run else 1024)
        if 2 in parts:
            results["full"] = part_full(root, args)
        if 3 in parts:
            results["loader"] = part_loader(root, args.dry_run, results.get("full", {}).get("samples_per_s"))
    finally:
        (root / "results.json").write_text(json.dumps(results, indent=2))
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print("gpu_smoke results: " + json.dumps(results), flush=True)
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


def _install(wheels: str) -> None:
    found = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *found], check=True)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _env(dry: bool) -> dict:
    """The launchers' environment: DS_ACCELERATOR=cpu on CPU ranks only (a GPU run refuses it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    if dry:
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    return env


def _run(cmd: list[str], dry: bool, label: str, timeout: int = 420) -> str:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(dry), capture_output=True, text=True, timeout=timeout)
    print(f"  {label}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_smoke: {label} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------- part 1: the deepspeed launcher, stop and resume


def part_tiny(root: Path, dry: bool) -> dict:
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    print("part 1: tiny stage 2 under the deepspeed launcher, 20 steps, evaluated, stopped at 10 and resumed",
          flush=True)
    write_shards(synthetic_records(512, seed=0, split="train"), str(root / "tiny" / "train"), progress=False)
    write_shards(synthetic_records(64, seed=1, split="test"), str(root / "tiny" / "test"), progress=False)
    generate = 8 if _importable("sklearn") and _importable("pycocoevalcap") else 0  # the evaluator's scoring
    run_dir = root / "tiny" / "run"
    args = [f"data.train.shards={root / 'tiny' / 'train'}", f"data.eval.shards={root / 'tiny' / 'test'}",
            "data.train.batch_size=16", "data.eval.batch_size=8", "model.freeze_lm=false", "model.dropout=0.0",
            "optim.lr=3e-3", "optim.warmup_steps=2", "train.max_steps=20", "train.log_every=1", "train.ckpt_every=10",
            "train.eval_every=10", "train.eval_batches=2", f"train.eval_generate={generate}",
            "train.eval_max_new_tokens=12", "tracking.enabled=false", f"train.run_dir={run_dir}"]
    first = _run(_deepspeed(args + ["train.stop_after=10"]), dry, "steps 1-10")
    second = _run(_deepspeed(args), dry, "resumed, steps 11-20")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    digests = dict(re.findall(r"trainable weights (saved|restored) at step 10: sha256 (\w+)", first + second))
    evaluated = {m["step"]: round(m["eval/loss"], 4) for m in metrics if "eval/loss" in m}
    out = {"losses": [round(x, 4) for x in losses], "eval_loss": evaluated,
           "resumed_at": int(re.search(r"start step (\d+) of 20", second).group(1)),
           "digest_saved": digests.get("saved"), "digest_restored": digests.get("restored"),
           "eval_captions": generate, "export": (run_dir / "export" / "config.json").is_file()}
    falls = sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    exact = out["digest_saved"] is not None and out["digest_saved"] == out["digest_restored"]
    out["ok"] = bool(falls and exact and out["resumed_at"] == 10 and sorted(evaluated) == [10, 20] and out["export"])
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} (mean of the last 3 below 0.8 x the first 3: {falls}); "
          f"held-out loss {evaluated}; resumed at step {out['resumed_at']}; digest at the save "
          f"{out['digest_saved']} and at the resume {out['digest_restored']} (equal: {exact})", flush=True)
    return out


def _deepspeed(args: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
            "launch/finetune.py", "--deepspeed", "ds_configs/zero3.json", *args]


# ---------------------------------------------------------------- part 2: the paper's shape through the loop


def _write_jpeg_shards(out: Path, n: int) -> None:
    """`n` synthetic faces as 640x480 JPEGs (quality 90), a camera's frame around a 480-px face."""
    import io
    import random

    from PIL import Image

    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    def frames():
        rng = random.Random(0)
        for record in synthetic_records(n, seed=2, image_size=480):
            canvas = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
            canvas.paste(record["image"].convert("RGB"), (80, 0))
            buf = io.BytesIO()
            canvas.save(buf, format="JPEG", quality=90)
            yield {**record, "image": buf.getvalue()}

    write_shards(frames(), str(out), samples_per_shard=256, progress=False)


def part_full(root: Path, args: argparse.Namespace) -> dict:
    print("part 2: " + ("tiny (dry run)" if args.dry_run else "vitg-opt6.7b") + " stage 2 through loop.setup / "
          "loop.step", flush=True)
    spec = {"root": str(root), "dry": args.dry_run, "micro_batch": 4 if args.dry_run else args.micro_batch,
            "steps": 3 if args.dry_run else args.steps, "peak_tflops": args.peak_tflops}
    if not args.dry_run:
        start = time.perf_counter()
        from paper_scale import write_weights

        write_weights("vitg-opt6.7b", root / "weights", device="cuda")
        print(f"  random vitg-opt6.7b written with save_pretrained in {time.perf_counter() - start:.0f} s", flush=True)
    text = _run([sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)], args.dry_run,
                "measured")
    out = json.loads(text.split("MEASURED ", 1)[1].splitlines()[0])
    for line in out.pop("lines"):
        print("  " + line, flush=True)
    return out


def _measure(spec: dict) -> int:
    """Part 2 in its own process: setup, warm-up, timed steps, a profiled window, memory."""
    import torch

    from expblip.config import load_config
    from expblip.log import setup_logging
    from expblip.train import comm, loop

    setup_logging(0)
    root, dry = Path(spec["root"]), spec["dry"]
    overrides = [f"data.train.shards={root / 'jpeg'}", f"data.train.batch_size={spec['micro_batch']}",
                 f"data.train.num_workers={1 if dry else min(8, (os.cpu_count() or 2) - 2)}", "data.max_text_tokens=40",
                 "train.max_steps=100000", "train.log_every=100000", "train.ckpt_every=0", "tracking.enabled=false",
                 f"train.run_dir={root / 'full-run'}", "train.overwrite=true", "train.resume=false"]
    if dry:  # the tiny preset at its own image size, random towers, the CPU's fp32
        overrides += ["model.preset=tiny", "model.weights=", "data.train.image_size=64", "model.frozen_dtype=float32",
                      "train.ds_config=ds_configs/zero3.json"]
    else:
        overrides += [f"model.weights={root / 'weights'}"]
    cfg = load_config(REPO / "recipes" / "paper_stage2.yaml", overrides)
    run = loop.setup(cfg)
    cuda = run.engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        loop.step(run)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        loop.step(run)
    sync()
    seconds = (time.perf_counter() - start) / spec["steps"]
    idle = _idle_share(run, sync) if cuda else None
    print("MEASURED " + json.dumps(_figures(run, spec, seconds, idle, cuda)), flush=True)
    comm.close_distributed()
    return 0


def _idle_share(run, sync) -> float:
    """1 - (union of the CUDA kernels' time) / (wall time) over 3 profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from expblip.train import loop

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync()
        start = time.perf_counter()
        for _ in range(3):
            loop.step(run)
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return max(0.0, 1.0 - busy / wall_us)


def _figures(run, spec: dict, seconds: float, idle: float | None, cuda: bool) -> dict:
    import torch
    from gpu_step import peak_tflops, step_flops

    from expblip.train import engine as ds_engine
    from expblip.train import loop
    from expblip.train.plan import GiB, make_plan, plan_for_run

    batch = next(run.batches)
    flops = step_flops(run.engine.module, loop.model_inputs(run, batch), run.blip2_config)
    total = sum(flops.values())
    micro = spec["micro_batch"]
    out = {"preset": run.cfg.model.preset, "micro_batch": micro, "seconds_per_step": round(seconds, 4),
           "samples_per_s": round(micro / seconds, 2), "model_flop_per_step": total,
           "zero_stage": ds_engine.zero_stage(run.ds_config), "checkpointing": list(run.cfg.model.checkpointing),
           "precision": ds_engine.precision(run.ds_config)}
    lines = [f"{out['preset']} micro-batch {micro}, ZeRO-{out['zero_stage']}, {out['precision']}, checkpointing "
             f"{'+'.join(out['checkpointing']) or 'none'}: {seconds:.3f} s/step, {out['samples_per_s']} samples/s, "
             f"{total / 1e12:.4g} model TFLOP/step"]
    if cuda:
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name, spec["peak_tflops"]) * 1e12
        gib = torch.cuda.get_device_properties(0).total_memory / GiB
        plan = make_plan(plan_for_run(run.cfg, 1, 1, gib))
        predicted = plan.row("zero2" if out["zero_stage"] == 2 else "zero3").total_cfg_gpu / GiB
        used = torch.cuda.max_memory_allocated() / GiB
        out.update(mfu=round(total / seconds / peak, 4), gpu_idle=round(idle, 4), peak_gib=round(used, 2),
                   plan_gib=round(predicted, 2), ok=bool(total / seconds / peak >= 0.4 and idle < 0.05
                                                         and abs(used / predicted - 1) <= 0.15))
        lines += [f"MFU {100 * out['mfu']:.1f} % of {peak / 1e12:.0f} TFLOP/s (target >= 40 %); GPU idle "
                  f"{100 * idle:.1f} % of the step (target < 5 %)",
                  f"peak GPU memory {used:.1f} GiB allocated; plan.py {predicted:.1f} GiB; ratio {used / predicted:.2f} "
                  "(target within 15 %)"]
    else:
        lines.append("MFU, GPU idle share and GPU memory: not measured (no GPU)")
    out["lines"] = lines
    return out


# ---------------------------------------------------------------- part 3: the loader at a real image size


def part_loader(root: Path, dry: bool, step_rate: float | None) -> dict:
    """One data worker's samples/s on 640x480 JPEGs → 224 (train transforms), and the workers a node needs."""
    from expblip.data.stream import StreamConfig, make_loader

    print("part 3: the loader, 640x480 JPEGs random-resized-cropped to 224, one data worker", flush=True)
    batch, batches = (8, 6) if dry else (32, 24)
    cfg = StreamConfig(shards=str(root / "jpeg"), batch_size=batch, image_size=224, num_workers=1, train=True)
    loader = iter(make_loader(cfg, 0, 1))
    next(loader)  # the worker started, its first shard open
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    per_worker = batch * batches / (time.perf_counter() - start)
    out = {"samples_per_s_per_worker": round(per_worker, 1)}
    line = f"  one worker: {per_worker:.1f} samples/s"
    if step_rate:
        per_gpu = step_rate / per_worker
        out.update(workers_per_gpu=round(per_gpu, 2), workers_per_8_gpu_node=int(-(-8 * per_gpu // 1)),
                   ok=per_gpu <= 2)
        line += (f"; the step consumes {step_rate:.1f} samples/s per GPU: {per_gpu:.2f} workers per GPU, "
                 f"{out['workers_per_8_gpu_node']} for an 8-GPU node (target <= 2 per GPU)")
    print(line + (" (CPU dry run)" if dry else ""), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
