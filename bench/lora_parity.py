"""LoRA on a tiny Qwen-family LM vs the tiny-OPT recipe trained in full, on the synthetic-face world (CPU).

    python bench/lora_parity.py --out /tmp/parity            # both chains side by side, one process each (~25 min)
    python bench/lora_parity.py --out /tmp/parity --steps-scale 0.5

Chains (each stage a world of one, `expblip.pipeline.chain.launch(cfg, "local")`; the two chains run at once):
    OPT:  tiny_vision -> tiny_lm -> tiny_stage2 (the demo's recipe: the 2-layer OPT trains in full in stage 2)
    Qwen: tiny_vision -> tiny_lm (model.preset=tiny-qwen2.5) -> tiny_qwen_lora (the Qwen frozen, LoRA adapters train)
Both exports are evaluated on the same held-out faces (beam 3) beside every baseline chosen on the training labels.
The last line: `ratio: <LoRA-Qwen mean AU F1 - full-OPT mean AU F1>` (target: >= -0.05).
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


def train_chain(name: str, out: Path, shards: dict, scale: float, times: dict) -> None:
    from expblip.config import load_config
    from expblip.pipeline.chain import launch

    weights = ""
    for stage, recipe, extra in CHAINS[name]:
        run_dir = out / "runs" / name / stage
        steps = max(1, int(STEPS[stage] * scale))
        overrides = [f"data.train.shards={shards['train']}", f"train.run_dir={run_dir}", f"train.max_steps={steps}",
                     f"train.ckpt_every={steps}", "tracking.enabled=false", *extra]
        overrides += [f"model.weights={weights}"] if weights else ["model.weights="]
        start = time.perf_counter()
        if not (run_dir / "export" / "config.json").is_file():
            launch(load_config(REPO / "recipes" / f"{recipe}.yaml", overrides), "local")
        times[f"{name}.{stage}"] = time.perf_counter() - start
        weights = str(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/expblip-lora-parity")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--beams", type=int, default=3)
    args = parser.parse_args(argv)
    from expblip.eval.evaluate import evaluate_export, training_text
    from expblip.eval.report import baseline_table
    from expblip.model.blip2 import GenerationConfig
    from expblip.pipeline.demo import DemoConfig, make_shards

    out = Path(args.out)
    shards = make_shards(DemoConfig(out=str(out)))
    times: dict = {}
    threads = [threading.Thread(target=train_chain, args=(n, out, shards, args.steps_scale, times)) for n in CHAINS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    train = training_text(shards["train"])
    scores = {}
    for name in CHAINS:
        result = evaluate_export(out / "runs" / name / "stage2", shards["test"], train=train, batch_size=32,
                                 gen=GenerationConfig(num_beams=args.beams), progress=False)
        scores[name] = result
        print(f"== {name}\n{baseline_table(result)}")
    print("seconds per stage:", {k: round(v) for k, v in times.items()})
    for name, label in (("opt", "tiny OPT, trained in full"), ("qwen", "tiny Qwen2.5 family, LoRA")):
        r = scores[name]
        print(f"{label}: held-out mean AU F1 {r['model']['mean_au_f1']:.3f} "
              f"(best constant caption: {r['best']['mean_au_f1']['score']:.3f})")
    print(f"ratio: {scores['qwen']['model']['mean_au_f1'] - scores['opt']['model']['mean_au_f1']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
