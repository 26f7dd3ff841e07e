"""The paper's shape on this CPU machine: ViT-g + OPT-6.7B written, loaded, trained, checkpointed, resumed, exported.

    # the real shape (7.75 B parameters, a 15.5 GB bf16 checkpoint): needs ~20 GiB free and ~50 GB of disk
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/paper_scale.py --root /work/tmp-paper
    # the same code paths at 0.2 B parameters (the `mid` preset), a few minutes
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/paper_scale.py --preset mid --root /tmp/paper-mid

A proof run, not a ratio benchmark (and not in the test suite). In order, each step a process of its own:

1. write a random `--preset` BLIP-2 with transformers' own save_pretrained: bf16, sharded safetensors + index
   (the public BLIP-2 layout), beside a tokenizer, under ROOT/weights;
2. write 224-px synthetic faces as shards;
3. train stage 2 with recipes/paper_stage2.yaml (bf16 policy, frozen towers partitioned on CPU ranks, OPT
   checkpointed) on 2 ZeRO-3 CPU ranks for --steps steps, checkpointing at the end;
4. resume that checkpoint on 2 ranks and, from a copy, on 1 rank, one step each;
5. the run's trainable-only export (written at the end of step 3) merged onto ROOT/weights with
   launch/export.py --merge, then loaded by stock transformers, which captions a face;

and prints each rank's peak host RSS beside plan.py's prediction for the same setting (expblip.train.plan.
host_rank_bytes), the seconds per step, the trainable-weight digests at the checkpoint and at each resume, and the
sizes of the checkpoint and the exports. ROOT is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's expblip, also when run from elsewhere
GiB = 2**30
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning", "PYTHONPATH": str(REPO)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vitg-opt6.7b", help="model preset (default: the paper's vitg-opt6.7b)")
    parser.add_argument("--root", default="/work/tmp-paper", help="working directory (deleted at the end)")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the first run")
    parser.add_argument("--batch-size", type=int, default=2, help="images per rank per step")
    parser.add_argument("--samples", type=int, default=64, help="synthetic faces in the shards")
    parser.add_argument("--keep", action="store_true", help="keep ROOT")
    parser.add_argument("--write-weights", help=argparse.SUPPRESS)  # internal: step 1 in its own process
    parser.add_argument("--max-shard-size", default="5GB", help=argparse.SUPPRESS)  # of --write-weights
    parser.add_argument("--caption", help=argparse.SUPPRESS)  # internal: step 5's stock-transformers caption
    return parser.parse_args(argv)


# ---------------------------------------------------------------- step 1 and 5, each in a process of its own


def write_weights(preset: str, out: Path, max_shard_size: str = "5GB", device: str = "cpu") -> None:
    """A random BLIP-2 of the preset, built on the meta device, materialised in bf16 on `device` (a GPU draws 7.75 B
    normals in seconds), saved by transformers."""
    import torch

    from expblip.data.synthetic import synthetic_records
    from expblip.model.blip2 import ModelConfig, blip2_config, construct
    from expblip.model.tokenizer import train_caption_tokenizer

    captions = [c for r in synthetic_records(400, seed=3) for c in r["captions"]]
    tokenizer = train_caption_tokenizer(captions, vocab_size=512)  # the LM keeps OPT's 50272-row embedding
    config = blip2_config(ModelConfig(preset=preset, tokenizer="-"), tokenizer)
    start = time.perf_counter()
    with torch.device("meta"):  # no memory, no initialisation; then bf16 storage, never an fp32 copy
        model = construct(config, init=False, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every module a new Parameter: OPT's head and embedding are one again
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    made = time.perf_counter() - start
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    print(f"wrote {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters to {out} "
          f"(initialised in {made:.0f} s, saved in {time.perf_counter() - start - made:.0f} s)", flush=True)


def caption_with_stock_transformers(export: Path) -> None:
    """What a user without expblip does: from_pretrained in bf16, BLIP's own image processor, generate."""
    import torch
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from expblip.data.synthetic import draw_face

    meta = json.loads((export / "expblip.json").read_text())
    start = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(str(export), dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    loaded = time.perf_counter() - start
    processor = BlipImageProcessorPil(size={"height": meta["image_size"], "width": meta["image_size"]},
                                      image_mean=meta["mean"], image_std=meta["std"], resample=3)
    import random

    image = draw_face([6, 12], random.Random(0), 224)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, num_beams=1, do_sample=False)
    new = out[0, model.config.num_query_tokens + 1:]
    text = tokenizer.decode(new, skip_special_tokens=True)  # random weights: ids past the 512-word vocabulary are ''
    print(f"stock transformers: loaded in {loaded:.0f} s, captioned a 224-px face in "
          f"{time.perf_counter() - start - loaded:.0f} s: new token ids {new.tolist()} -> {text!r} (random weights); "
          f"peak RSS {_self_peak_gib():.2f} GiB", flush=True)


def _self_peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


# ---------------------------------------------------------------- the driver


class PeakMonitor:
    """Polls the resident memory of a process tree: the peak of its sum (the whole run) while it runs."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.root, self.interval, self.peak, self._stop = psutil.Process(pid), interval, 0, threading.Event()
        self.loads: list[float] = []  # the machine's 1-minute load average: other jobs share its cores
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, total)
                self.loads.append(os.getloadavg()[0])
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / GiB


def run(cmd: list[str], label: str, log_dir: Path, timeout: int = 7200) -> tuple[str, float, float]:
    """Run a step; returns (its stdout, seconds, peak total RSS of its process tree in GiB). Fails loudly."""
    print(f"--- {label}: {' '.join(cmd[-6:])}", flush=True)
    start = time.perf_counter()
    with open(log_dir / f"{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        monitor = PeakMonitor(proc.pid)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if line.startswith(("[expblip]", "wrote ", "stock transformers")) or "error" in line.lower():
                print("    " + line.rstrip(), flush=True)
        code = proc.wait(timeout=timeout)
    peak = monitor.stop()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{label} failed (exit {code}); see {log_dir / (label + '.log')}")
    load = sum(monitor.loads) / max(1, len(monitor.loads))
    print(f"    {label}: {seconds:.0f} s, peak RSS of the whole step {peak:.2f} GiB, mean load average {load:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    return "".join(lines), seconds, peak


def deepspeed(ranks: int, args: list[str]) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            "launch/finetune.py", *args]


def train_args(a: argparse.Namespace, weights: Path, shards: Path, run_dir: Path, max_steps: int) -> list[str]:
    return ["--config", "recipes/paper_stage2.yaml", f"model.preset={a.preset}", f"model.weights={weights}",
            f"data.train.shards={shards}", f"data.train.batch_size={a.batch_size}", "data.train.num_workers=0",
            "data.max_text_tokens=40", "model.dropout=0.0", f"train.max_steps={max_steps}", "train.log_every=1",
            f"train.ckpt_every={a.steps}", "optim.warmup_steps=1", "train.export=trainable",
            "tracking.enabled=false", f"train.run_dir={run_dir}"]


def rank_peaks(out: str) -> list[float]:
    line = re.findall(r"peak host RSS per rank \(GiB\): (.*)", out)[-1]
    return [float(x) for x in re.findall(r"rank \d+ ([\d.]+)", line)]


def predicted_gib(a: argparse.Namespace, world: int, ds_config: dict) -> float:
    from expblip.train.plan import PlanConfig, count_params, host_rank_bytes

    plan = PlanConfig(preset=a.preset, gpus_per_node=world, micro_batch=a.batch_size, text_tokens=40,
                      checkpointing=("lm",))
    max_live = ds_config["zero_optimization"].get("stage3_max_live_parameters", 0)
    parts = host_rank_bytes(count_params(a.preset), world, plan, max_live)
    return sum(parts.values()) / GiB


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GiB


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.write_weights:
        write_weights(a.preset, Path(a.write_weights), a.max_shard_size)
        return 0
    if a.caption:
        caption_with_stock_transformers(Path(a.caption))
        return 0
    root = Path(a.root)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--root {root} is not empty; give a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _bench(a, root)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root}")


def _bench(a: argparse.Namespace, root: Path) -> int:
    import psutil

    logs = root / "logs"
    logs.mkdir()
    weights, shards, run_dir, run1 = root / "weights", root / "shards", root / "run", root / "run-1rank"
    print(f"paper_scale: preset {a.preset}, root {root}; memory available {psutil.virtual_memory().available / GiB:.1f}"
          f" of {psutil.virtual_memory().total / GiB:.1f} GiB, {os.cpu_count()} cores", flush=True)
    _, t_write, rss_write = run([sys.executable, __file__, "--preset", a.preset, "--write-weights", str(weights)],
                                "write", logs)
    _write_shards(shards, a.samples)
    out1, t_train, total1 = run(deepspeed(2, train_args(a, weights, shards, run_dir, a.steps)), "train-2ranks", logs)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    shutil.copytree(run_dir, run1)
    out2, _, total2 = run(deepspeed(2, train_args(a, weights, shards, run_dir, a.steps + 1)), "resume-2ranks", logs)
    out3, _, total3 = run(deepspeed(1, train_args(a, weights, shards, run1, a.steps + 1)), "resume-1rank", logs)
    merged = root / "merged"
    _, t_merge, rss_merge = run([sys.executable, "launch/export.py", "--merge", str(run_dir / "export-trainable"),
                                 "--towers", str(weights), "--out", str(merged), "--dtype", "bfloat16"], "merge", logs)
    _, _, rss_caption = run([sys.executable, __file__, "--caption", str(merged)], "caption", logs)
    _summary(a, locals())
    return 0


def _write_shards(out: Path, samples: int) -> None:
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    write_shards(synthetic_records(samples, seed=0, image_size=224), str(out), samples_per_shard=32, progress=False)


def _digests(out: str) -> dict[str, str]:
    return {f"{what} at step {step}": digest for what, step, digest in
            re.findall(r"trainable weights (saved|restored) at step (\d+): sha256 (\w+)", out)}


def _seconds_per_step(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds_per_step"] for r in rows]


def _summary(a: argparse.Namespace, v: dict) -> None:
    """The figures, in the order docs/paper-scale.md quotes them."""
    print("\n=== paper_scale summary ===")
    print(f"preset {a.preset}; random bf16 checkpoint {du(v['weights']):.2f} GiB written by save_pretrained in "
          f"{v['t_write']:.0f} s ({len(list(v['weights'].glob('*.safetensors')))} shards + index), peak RSS "
          f"{v['rss_write']:.2f} GiB")
    print("peak host RSS per rank vs plan.py (expblip.train.plan.host_rank_bytes), target <= 1.3 x plan + 1 GiB:")
    for label, out, world, total in (("train, 2 ranks", v["out1"], 2, v["total1"]),
                                      ("resume, 2 ranks", v["out2"], 2, v["total2"]),
                                      ("resume, 1 rank", v["out3"], 1, v["total3"])):
        plan = predicted_gib(a, world, v["ds_config"])
        peaks = rank_peaks(out)
        verdict = "ok" if all(p <= 1.3 * plan + 1 for p in peaks) else "ABOVE TARGET"
        print(f"  {label:<16} " + ", ".join(f"rank {r} {p:.2f} GiB" for r, p in enumerate(peaks))
              + f"; plan {plan:.2f} GiB/rank; {verdict}; whole run (all processes) {total:.2f} GiB")
    steps = _seconds_per_step(v["run_dir"])
    print(f"seconds per step (2 ranks, batch {a.batch_size} per rank): " + ", ".join(f"{s:.1f}" for s in steps)
          + f"; 1 rank: {_seconds_per_step(v['run1'])[-1]:.1f}")
    saved, resumed2, resumed1 = _digests(v["out1"]), _digests(v["out2"]), _digests(v["out3"])
    print(f"trainable weights: {saved}; resumed on 2 ranks: {resumed2}; resumed on 1 rank: {resumed1}")
    start = {label: re.findall(r"start step (\d+)", out)[-1] for label, out in (("2 ranks", v["out2"]),
                                                                               ("1 rank", v["out3"]))}
    print(f"resumes start at step {start} and end at step {a.steps + 1}")
    ckpt = v["run_dir"] / "checkpoints" / f"step{a.steps:08d}"
    print(f"sizes: checkpoint {du(ckpt):.3f} GiB ({len(list(ckpt.iterdir()))} files; frozen towers left out, "
          f"re-read from model.weights); trainable-only export {du(v['run_dir'] / 'export-trainable'):.3f} GiB; "
          f"merged export {du(v['merged']):.2f} GiB (merge {v['t_merge']:.0f} s, peak RSS {v['rss_merge']:.2f} GiB)")
    print(f"stock transformers caption: peak RSS {v['rss_caption']:.2f} GiB (see the caption line above)")


if __name__ == "__main__":
    sys.exit(main())
