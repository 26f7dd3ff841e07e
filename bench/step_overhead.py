"""Our training step against a bare DeepSpeed loop: same tiny model, same ZeRO-3 config, same batches, 2 ranks.

    python bench/step_overhead.py [--steps 60] [--ranks 2]      # CPU: set DS_ACCELERATOR=cpu OMP_NUM_THREADS=1

"ours" is expblip.train.loop.train_step (stream decode + tokenisation + engine forward/backward/step + cursor
and error bookkeeping); "bare" is deepspeed.initialize on the same CaptionModel fed the same, already tokenised
batches from memory. Both run in the same processes, alternating in rounds so machine noise hits both.
The last line is `ratio: <ours/bare>` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(root: Path) -> Path:
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    write_shards(synthetic_records(1024, seed=0), str(root / "train"), samples_per_shard=256, progress=False)
    return root / "train"


def worker(shards: str, steps: int, rounds: int) -> None:
    import torch

    from expblip.config import load_config
    from expblip.model.blip2 import CaptionModel, apply_freezing, build_model
    from expblip.train import engine as ds_engine
    from expblip.train.loop import model_inputs, setup, train_step
    from expblip.train.optim import build_optimizer

    run_dir = Path(shards).parent / "run"
    cfg = load_config(None, [f"data.train.shards={shards}", "data.train.batch_size=16", "tracking.enabled=false",
                             f"train.run_dir={run_dir}", "train.overwrite=true", "train.resume=false",
                             "model.dropout=0.0", "train.max_steps=100000"])
    run = setup(cfg)
    batches = [model_inputs(run, next(run.batches)) for _ in range(steps)]  # the same batches, pre-tokenised
    torch.manual_seed(0)
    bare_model = CaptionModel(ds_engine.build_partitioned(run.ds_config, lambda: build_model(cfg.model, run.tokenizer)))
    apply_freezing(bare_model.blip2, cfg.model, cfg.train.stage)
    bare = ds_engine.initialize(bare_model, build_optimizer(bare_model, cfg.optim), None, run.ds_config)

    def time_bare() -> float:
        start = time.perf_counter()
        for inputs in batches:
            loss = bare(**inputs)
            bare.backward(loss)
            bare.step()
        return time.perf_counter() - start

    def time_ours() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(run)
        return time.perf_counter() - start

    time_bare(), time_ours()  # warm-up
    totals = {"bare": 0.0, "ours": 0.0}
    for _ in range(rounds):
        totals["bare"] += time_bare()
        totals["ours"] += time_ours()
    if run.rank == 0:
        n = steps * rounds
        print(f"bare DeepSpeed step: {1000 * totals['bare'] / n:.1f} ms   expblip step: {1000 * totals['ours'] / n:.1f} ms"
              f"   ({n} steps each, world {run.world})")
        print(f"ratio: {totals['ours'] / totals['bare']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.rounds)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_data(Path(tmp))
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), __file__,
               "--worker", str(shards), "--steps", str(args.steps), "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("bare DeepSpeed", "ratio:"))]
    if proc.returncode != 0 or len(lines) != 2:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
