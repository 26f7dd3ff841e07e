"""Our training step against a bare DeepSpeed loop: same tiny model, same ZeRO-3 config, same batches, 2 ranks.

    python bench/step_overhead.py [--steps 20] [--rounds 5] [--ranks 2]   # CPU: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1

Both sides train the same tiny BLIP-2 (stage 2) in the same processes, on the same batches: ``--steps`` loader
batches (decoded, augmented images and their captions) are read once per rank before timing, and every round feeds
that same list to both sides.

"ours"  ``expblip.train.loop.step``, the loop's real step: the batch's cursor and error bookkeeping, tokenisation
        (``model_inputs``), the engine's forward / backward / step, the loss window, and every ``--log-every`` steps
        the metrics all-reduce, the metrics.jsonl line, the MLflow log (SQLite, rank 0) and the console line.
"bare"  what a plain DeepSpeed user writes: the same tokenisation (``caption_inputs``) and forward / backward / step
        on a second engine built from the same config and initial weights; no bookkeeping, metrics or logging.

Rounds alternate their order (bare, ours; ours, bare; ...) with a barrier around every timed block; the figures are
medians over the rounds, and the last line is ``ratio: <ours/bare>``: the median of the rounds' time ratios
(target <= 1.05). It never asserts a time.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import alternating, median, median_ratio  # noqa: E402 - bench/rounds.py, beside this script


def make_data(root: Path) -> Path:
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    write_shards(synthetic_records(1024, seed=0), str(root / "train"), samples_per_shard=256, progress=False)
    return root / "train"


def _bare_engine(run):
    """A second engine built by the loop's own builder: same model config, initial weights, freezing and dtypes."""
    import torch

    from expblip.train import engine as ds_engine
    from expblip.train.loop import build_unit
    from expblip.train.optim import build_optimizer

    torch.manual_seed(run.cfg.train.seed)
    model = build_unit(run.cfg, run.ds_config, run.tokenizer, run.qformer_tokenizer, init=True)
    return ds_engine.initialize(model, build_optimizer(model, run.cfg.optim), None, run.ds_config)


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(shards: str, steps: int, rounds: int, log_every: int) -> None:
    from expblip.config import load_config
    from expblip.log import setup_logging
    from expblip.model.blip2 import caption_inputs
    from expblip.pixels import normalise
    from expblip.train.loop import setup, step

    run_dir = Path(shards).parent / "run"
    cfg = load_config(None, [f"data.train.shards={shards}", "data.train.batch_size=16", f"train.run_dir={run_dir}",
                             "train.overwrite=true", "train.resume=false", "model.dropout=0.0", "train.max_steps=100000",
                             f"train.log_every={log_every}", "train.ckpt_every=0",
                             f"tracking.uri=sqlite:///{run_dir}/mlflow.db", "tracking.system_metrics_every_s=0"])
    setup_logging(int(os.environ.get("RANK", "0")), level=40)  # the console line is formatted, not shown
    run = setup(cfg)
    loader, batches = run.batches, [next(run.batches) for _ in range(steps)]  # the same batches for both sides
    bare = _bare_engine(run)
    queries, max_tokens = run.blip2_config.num_query_tokens, cfg.data.max_text_tokens

    def ours() -> None:
        run.batches = iter(batches)
        for _ in range(steps):
            step(run)

    def plain() -> None:
        for batch in batches:
            inputs = caption_inputs(run.tokenizer, batch["captions"], queries, max_tokens)
            inputs["pixel_values"] = normalise(batch["pixel_values"])  # the loader's uint8, as the loop normalises
            loss = bare(**{k: v.to(bare.device) for k, v in inputs.items()})
            bare.backward(loss)
            bare.step()

    ours(), plain()  # warm-up: first forward, optimiser state
    seconds = alternating({"bare": lambda: _timed(plain), "ours": lambda: _timed(ours)}, rounds)
    run.batches = loader
    if run.rank == 0:
        ms = {name: 1000 * median(values) / steps for name, values in seconds.items()}
        print(f"bare DeepSpeed step: {ms['bare']:.1f} ms   expblip step: {ms['ours']:.1f} ms   (medians of {rounds} "
              f"alternating rounds of {steps} steps, world {run.world}, log every {log_every})")
        print("per-round ratios: " + " ".join(f"{o / b:.3f}" for o, b in zip(seconds["ours"], seconds["bare"],
                                                                            strict=True)))
        print(f"ratio: {median_ratio(seconds, 'ours', 'bare'):.3f}", flush=True)
    run.tracker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10, help="ours logs (all-reduce, MLflow, jsonl) this often")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.rounds, args.log_every)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_data(Path(tmp))
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), __file__,
               "--worker", str(shards), "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--log-every", str(args.log_every)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("bare DeepSpeed", "per-round", "ratio:"))]
    if proc.returncode != 0 or len(lines) != 3:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
