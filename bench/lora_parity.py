"""LoRA on a tiny Qwen-family LM vs the tiny-OPT recipe trained in full, on the synthetic-face world (CPU).

    python bench/lora_parity.py --out /tmp/parity            # both chains side by side, one process each (~25 min)
    python bench/lora_parity.py --out /tmp/parity --seeds 3  # seeds 0..2: mean ± SD and each seed's interval
    python bench/lora_parity.py --out /tmp/parity --seeds 3 --lora 4:16,5:64,5:128,5:256,5:512   # choose, 3 seeds (~48 min)
    python bench/lora_parity.py --out /tmp/parity --steps-scale 0.5

Chains (each stage a world of one, `expblip.pipeline.chain.launch(cfg, "local")`; two stages run at once):
    OPT:  tiny_vision -> tiny_lm -> tiny_stage2 (the demo's recipe: the 2-layer OPT trains in full in stage 2)
    Qwen: tiny_vision -> tiny_lm (model.preset=tiny-qwen2.5) -> tiny_qwen_lora (the Qwen frozen, LoRA adapters train)
Both exports are scored on the validation faces (what a setting may be chosen on) and once on the test faces (what
is reported), beside every baseline chosen on the training labels. --lora R:ALPHA,... lists LoRA settings to choose
from: on seed 0 each trains its own Qwen stage 2 on the same towers and is scored on the validation faces only; the
setting with the best validation mean AU F1 is the one every seed then runs (seed 0's reused) and the only one the
test faces ever see. Without --lora the recipe's own setting runs, unchosen. A seed varies every stage's
initialisation and data order (train.seed, data.train.seed), never the faces. Per seed: the paired 95 % interval of
LoRA − full on the test faces (expblip.eval.paired: whole AU patterns resampled), and the verdict for "within 0.05"
(met only where every seed's interval lies above −0.05). The last line: `ratio: <mean over seeds of LoRA-Qwen mean
AU F1 − full-OPT mean AU F1>` on the test faces (target: >= -0.05).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from chains import side_by_side, train_stages  # noqa: E402 - bench/chains.py, beside this script

STEPS = {"vision": 1000, "lm": 300, "stage2": 900}  # the demo's
CHAINS = {"opt": [("vision", "tiny_vision", []), ("lm", "tiny_lm", []), ("stage2", "tiny_stage2", [])],
          "qwen": [("vision", "tiny_vision", ["model.preset=tiny-qwen2.5"]),
                   ("lm", "tiny_lm", ["model.preset=tiny-qwen2.5"]), ("stage2", "tiny_qwen_lora", [])]}
MARGIN = 0.05  # LoRA may trail full fine-tuning by at most this much mean AU F1


def lora_settings(text: str) -> list[tuple[int, int]]:
    """"4:16,5:256" -> [(4, 16), (5, 256)] (rank r, alpha)."""
    try:
        settings = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        settings = []
    if not settings or any(len(t) != 2 or min(t) < 1 for t in settings):
        raise SystemExit(f"--lora {text!r}: give R:ALPHA pairs of positive integers, e.g. --lora 4:16,5:256")
    return settings


def stage_dir(out: Path, name: str, stage: str, lora: tuple[int, int] | None) -> Path:
    """Each LoRA setting's Qwen stage 2 has its own run directory; the towers are shared."""
    suffix = f"-r{lora[0]}a{lora[1]}" if name == "qwen" and stage == "stage2" and lora else ""
    return out / "runs" / name / f"{stage}{suffix}"


def train_chain(name: str, out: Path, shards: dict, scale: float, times: dict, seed: int = 0,
                lora: tuple[int, int] | None = None) -> None:
    stages = []
    for stage, recipe, extra in CHAINS[name]:
        if lora and recipe == "tiny_qwen_lora":
            extra = [*extra, f"model.lora.r={lora[0]}", f"model.lora.alpha={lora[1]}"]
        stages.append((stage_dir(out, name, stage, lora), recipe, STEPS[stage], extra))
    train_stages(stages, shards["train"], seed, times, name, scale)


def in_pairs(jobs: list[tuple], times: dict) -> None:
    """Run train_chain jobs two at a time (one per core), in order; a failed one stops the bench."""
    side_by_side([functools.partial(train_chain, *job[:4], times, *job[4:]) for job in jobs])


def score(run_dir: Path, shards: dict, split: str, train: list, beams: int) -> dict:
    from expblip.eval.evaluate import evaluate_export
    from expblip.model.generation import GenerationConfig

    return evaluate_export(run_dir, shards[split], train=train, batch_size=32, gen=GenerationConfig(num_beams=beams),
                           progress=False)


def choose_lora(out: Path, shards: dict, args: argparse.Namespace, settings: list[tuple[int, int]]) -> tuple:
    """Seed 0: every setting's Qwen stage 2 on the same towers, scored on the validation faces only; the best."""
    from expblip.eval.evaluate import training_text

    times: dict = {}
    jobs = [("opt", out, shards, args.steps_scale, 0)] + [("qwen", out, shards, args.steps_scale, 0, s)
                                                          for s in settings]
    in_pairs(jobs[:2], times)  # the OPT chain beside the Qwen towers and the first setting
    in_pairs(jobs[2:], times)
    print("seed 0, choosing: seconds per stage:", {k: round(v) for k, v in times.items()}, flush=True)
    train = training_text(shards["train"])
    val = {s: score(stage_dir(out, "qwen", "stage2", s), shards, "val", train, args.beams)["model"]["mean_au_f1"]
           for s in settings}
    for s, f1 in val.items():
        print(f"LoRA r {s[0]}, alpha {s[1]}: validation mean AU F1 {f1:.3f}")
    best = max(settings, key=lambda s: val[s])  # ties: the first listed
    print(f"chosen on the validation faces: r {best[0]}, alpha {best[1]}", flush=True)
    return best


def one_seed(out: Path, shards: dict, args: argparse.Namespace, seed: int,
             lora: tuple[int, int] | None = None) -> dict:
    """Train both chains of one seed side by side; {"val"|"test": {chain: evaluate_export result}}."""
    from expblip.eval.evaluate import training_text

    times: dict = {}
    in_pairs([("opt", out, shards, args.steps_scale, seed), ("qwen", out, shards, args.steps_scale, seed, lora)],
             times)
    print(f"seed {seed}: seconds per stage:", {k: round(v) for k, v in times.items()}, flush=True)
    train = training_text(shards["train"])
    return {split: {name: score(stage_dir(out, name, "stage2", lora), shards, split, train, args.beams)
                    for name in CHAINS} for split in ("val", "test")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/expblip-lora-parity")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (each in OUT/seedK)")
    parser.add_argument("--lora", type=lora_settings, default=None, metavar="R:ALPHA,...",
                        help="LoRA settings to choose from on seed 0's validation faces (default: the recipe's)")
    args = parser.parse_args(argv)
    from expblip.eval.intervals import mean_sd, verdict
    from expblip.eval.paired import interval
    from expblip.eval.report import baseline_table
    from expblip.pipeline.demo import DemoConfig, make_shards

    out = Path(args.out)
    shards = make_shards(DemoConfig(out=str(out)))  # train, val and test faces: the same for every seed
    gaps, verdicts = {"val": [], "test": []}, []
    lora = choose_lora(out / "seed0", shards, args, args.lora) if args.lora else None
    for seed in range(args.seeds):
        scores = one_seed(out / f"seed{seed}", shards, args, seed, lora)
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
