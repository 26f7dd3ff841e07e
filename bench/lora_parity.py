"""LoRA on a tiny Qwen-family LM vs the tiny-OPT recipe trained in full, on the synthetic-face world (CPU).

    python bench/lora_parity.py --out /tmp/parity            # both chains side by side, one process each (~25 min)
    python bench/lora_parity.py --out /tmp/parity --seeds 3  # seeds 0..2: mean ± SD and each seed's interval
    python bench/lora_parity.py --out /tmp/parity --steps-scale 0.5

Chains (each stage a world of one, `expblip.pipeline.chain.launch(cfg, "local")`; the two chains run at once):
    OPT:  tiny_vision -> tiny_lm -> tiny_stage2 (the demo's recipe: the 2-layer OPT trains in full in stage 2)
    Qwen: tiny_vision -> tiny_lm (model.preset=tiny-qwen2.5) -> tiny_qwen_lora (the Qwen frozen, LoRA adapters train)
Both exports are scored on the validation faces (what a setting may be chosen on) and once on the test faces (what
is reported), beside every baseline chosen on the training labels. A seed varies every stage's initialisation and
data order (train.seed, data.train.seed), never the faces. Per seed: the paired 95 % interval of LoRA − full on the
test faces (expblip.eval.paired: whole AU patterns resampled), and the verdict for "within 0.05" (met only where
every seed's interval lies above −0.05). The last line: `ratio: <mean over seeds of LoRA-Qwen mean AU F1 −
full-OPT mean AU F1>` on the test faces (target: >= -0.05).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = {"vision": 1000, "lm": 300, "stage2": 900}  # the demo's
CHAINS = {"opt": [("vision", "tiny_vision", []), ("lm", "tiny_lm", []), ("stage2", "tiny_stage2", [])],
          "qwen": [("vision", "tiny_vision", ["model.preset=tiny-qwen2.5"]),
                   ("lm", "tiny_lm", ["model.preset=tiny-qwen2.5"]), ("stage2", "tiny_qwen_lora", [])]}


def train_chain(name: str, out: Path, shards: dict, scale: float, times: dict, seed: int = 0) -> None:
    from expblip.config import load_config
    from expblip.pipeline.chain import launch

    weights = ""
    for stage, recipe, extra in CHAINS[name]:
        run_dir = out / "runs" / name / stage
        steps = max(1, int(STEPS[stage] * scale))
        overrides = [f"data.train.shards={shards['train']}", f"train.run_dir={run_dir}", f"train.max_steps={steps}",
                     f"train.ckpt_every={steps}", "tracking.enabled=false", f"train.seed={seed}",
                     f"data.train.seed={seed}", *extra]
        overrides += [f"model.weights={weights}"] if weights else ["model.weights="]
        start = time.perf_counter()
        if not (run_dir / "export" / "config.json").is_file():
            launch(load_config(REPO / "recipes" / f"{recipe}.yaml", overrides), "local")
        times[f"{name}.{stage}"] = time.perf_counter() - start
        weights = str(run_dir)


MARGIN = 0.05  # LoRA may trail full fine-tuning by at most this much mean AU F1


def one_seed(out: Path, shards: dict, args: argparse.Namespace, seed: int) -> dict:
    """Train both chains of one seed side by side; {"val"|"test": {chain: evaluate_export result}}."""
    from expblip.eval.evaluate import evaluate_export, training_text
    from expblip.model.generation import GenerationConfig

    times: dict = {}
    threads = [threading.Thread(target=train_chain, args=(n, out, shards, args.steps_scale, times, seed))
               for n in CHAINS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"seed {seed}: seconds per stage:", {k: round(v) for k, v in times.items()}, flush=True)
    train = training_text(shards["train"])
    return {split: {name: evaluate_export(out / "runs" / name / "stage2", shards[split], train=train, batch_size=32,
                                          gen=GenerationConfig(num_beams=args.beams), progress=False)
                    for name in CHAINS} for split in ("val", "test")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/expblip-lora-parity")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (each in OUT/seedK)")
    args = parser.parse_args(argv)
    from expblip.eval.intervals import mean_sd, verdict
    from expblip.eval.paired import interval
    from expblip.eval.report import baseline_table
    from expblip.pipeline.demo import DemoConfig, make_shards

    out = Path(args.out)
    shards = make_shards(DemoConfig(out=str(out)))  # train, val and test faces: the same for every seed
    gaps, verdicts = {"val": [], "test": []}, []
    for seed in range(args.seeds):
        scores = one_seed(out / f"seed{seed}", shards, args, seed)
        for split in ("val", "test"):
            f1 = {n: scores[split][n]["model"]["mean_au_f1"] for n in CHAINS}
            gaps[split].append(f1["qwen"] - f1["opt"])
            print(f"seed {seed} {split}: full OPT {f1['opt']:.3f}, LoRA Qwen {f1['qwen']:.3f} (best constant "
                  f"caption {scores[split]['opt']['best']['mean_au_f1']['score']:.3f})")
        test = scores["test"]
        iv = interval("mean_au_f1", test["qwen"], test["opt"])
        verdicts.append(verdict(iv, margin=MARGIN))
        print(f"seed {seed} test: LoRA − full {iv}; within {MARGIN}: {verdicts[-1]}")
        print(f"== seed {seed}, test, full OPT\n{baseline_table(test['opt'])}\n== LoRA Qwen\n"
              f"{baseline_table(test['qwen'])}", flush=True)
    joint = verdicts[0] if len(set(verdicts)) == 1 else "not resolved at this test size"
    print(f"LoRA − full, mean AU F1 over {args.seeds} seed(s): validation {mean_sd(gaps['val'])}, test "
          f"{mean_sd(gaps['test'])}; within {MARGIN} on every seed's test interval: {joint}")
    print(f"ratio: {sum(gaps['test']) / len(gaps['test']):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
