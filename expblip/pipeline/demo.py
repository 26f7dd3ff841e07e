"""The embedded demo: the synthetic-face world, end to end on 2 CPU workers, in about twelve minutes.

    shards (train, val, test) -> 'vision' stage (the tiny ViT learns to see AUs) -> 'lm' stage (the tiny OPT learns
      the caption language) -> stage 2 (Q-Former + projection + ViT learn to describe faces; OPT frozen)
      -> evaluate on test, once -> describe

Held-out evaluation during stage 2 (eval.best_step, MLflow's eval/* curves) reads the validation faces; the test
faces are scored once, by the evaluator at the end, and the report says so.

Every training stage runs through Ray Train driving DeepSpeed ZeRO-3 (recipes/tiny_{vision,lm,stage2}.yaml).
Stages whose outputs exist are skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from expblip.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults finish in about twelve minutes on 2 cores
    (plus ~3 minutes to create the environment on a fresh machine)."""

    out: str = "demo"
    train_samples: int = 6000
    test_samples: int = 300
    val_samples: int = 300  # what held-out evaluation during training sees (never the test faces)
    vision_steps: int = 1000
    lm_steps: int = 300
    stage2_steps: int = 900
    beams: int = 3
    describe: int = 4  # held-out faces described at the end
    probe_train: int = 2000  # training faces for the linear probes
    verbose: bool = False  # Ray's own console output (ray.verbose)
    register: str = ""  # MLflow model name: log eval.* into the stage-2 run and register its export ('' = no)


def make_shards(demo: DemoConfig) -> dict[str, str]:
    from expblip.data.shards import MANIFEST, write_shards
    from expblip.data.synthetic import synthetic_records

    out = {}
    for split, n in (("train", demo.train_samples), ("val", demo.val_samples), ("test", demo.test_samples)):
        path = Path(demo.out, "shards", split)
        if not (path / MANIFEST).is_file():
            write_shards(synthetic_records(n, seed=0, split=split), str(path), samples_per_shard=500,
                         meta={"source": "synthetic", "split": split, "samples": n, "seed": 0})
        out[split] = str(path)
    return out


def stage_config(recipe: str, demo: DemoConfig, shards: str, steps: int, weights: str = "",
                 extra: list[str] | None = None) -> Config:
    overrides = [f"data.train.shards={shards}", f"train.run_dir={Path(demo.out, 'runs', recipe)}",
                 f"train.max_steps={steps}", f"tracking.uri=sqlite:///{Path(demo.out, 'mlflow.db').resolve()}",
                 f"ray.verbose={str(demo.verbose).lower()}"]
    if weights:
        overrides.append(f"model.weights={weights}")
    overrides += extra or []
    return load_config(REPO / "recipes" / f"{recipe}.yaml", overrides)


def train_stage(cfg: Config) -> str:
    """Run a stage on Ray unless its export already exists; returns the run directory."""
    from expblip.train.ray_job import run

    if not Path(cfg.train.run_dir, "export", "config.json").is_file():
        run(cfg)
    return cfg.train.run_dir


def evaluate(demo: DemoConfig, run_dir: str, shards: dict[str, str]) -> dict:
    from expblip.eval.evaluate import evaluate_export, training_text
    from expblip.eval.report import baseline_table, write_report
    from expblip.model.generation import GenerationConfig

    result = evaluate_export(run_dir, shards["test"], gen=GenerationConfig(num_beams=demo.beams),
                             train=training_text(shards["train"]), batch_size=32)
    write_report(result, Path(demo.out, "eval"))
    print(baseline_table(result))
    return result


def probe(demo: DemoConfig, run_dir: str, shards: dict[str, str]) -> list[dict]:
    """Linear probes on the trained Q-Former's query outputs (EXPBLIP.md, evaluation point 2), printed and saved."""
    from expblip.eval.probe import run_probes

    au, emotion = run_probes(run_dir, shards["train"], shards["test"], "qformer", ("au", "emotion"),
                             limit=demo.probe_train, batch_size=64)
    Path(demo.out, "eval", "probe.json").write_text(json.dumps([au, emotion], indent=2))
    print(f"linear probe on Q-Former features ({au['train_samples']} training faces): mean AU F1 {au['score']:.3f} "
          f"(all-positive {au['baseline']['score']:.3f}); emotion accuracy {emotion['score']:.3f} "
          f"(majority {emotion['baseline']['score']:.3f}, chance {emotion['chance']:.3f})")
    return [au, emotion]


def describe(demo: DemoConfig, run_dir: str) -> None:
    """Save a few held-out faces as PNG and caption them as `launch/describe.py` would."""
    from expblip.data.synthetic import synthetic_records
    from expblip.infer.captioner import Captioner, resolve_export

    faces = Path(demo.out, "faces")
    faces.mkdir(parents=True, exist_ok=True)
    records = list(synthetic_records(demo.describe, seed=1, split="test"))
    captioner = Captioner.from_export(resolve_export(run_dir))
    for rec, desc in zip(records, captioner.describe([r["image"] for r in records]), strict=True):
        path = faces / f"{rec['key']}.png"
        rec["image"].save(path)
        print(f"{path}: {desc['caption']}\n    parsed AUs {desc['aus']} | true AUs {rec['labels']['aus']}")


def register(demo: DemoConfig, run_dir: str, result: dict, run: dict) -> None:
    """The evaluation into the stage-2 run (eval.* metrics, report files), then its export into the Model Registry
    as a new version of ``demo.register``, tagged with those metrics."""
    from expblip.eval.report import log_to_mlflow
    from expblip.train.registry import register_export

    log_to_mlflow(result, Path(demo.out, "eval"), run["tracking_uri"], run["run_id"])
    done = register_export(Path(run_dir, "export"), demo.register, run["tracking_uri"])
    print(f"registered {Path(run_dir, 'export')} as {done.model_uri} "
          f"(eval.au_f1 {done.tags.get('eval.au_f1', '?')}, tagged with {len(done.tags) - 2} eval.* metrics)")


def run_demo(demo: DemoConfig | None = None) -> dict:
    from expblip.eval.report import summary_line

    demo = demo or DemoConfig()
    shards = make_shards(demo)
    vision = train_stage(stage_config("tiny_vision", demo, shards["train"], demo.vision_steps))
    lm = train_stage(stage_config("tiny_lm", demo, shards["train"], demo.lm_steps, weights=vision))
    # MLflow's eval/* curves: validation loss and strict scores while it trains; the test faces are scored once, below
    heldout = [f"data.eval.shards={Path(shards['val']).resolve()}", f"train.eval_every={max(1, demo.stage2_steps // 3)}",
               "train.eval_generate=64"]
    stage2 = train_stage(stage_config("tiny_stage2", demo, shards["train"], demo.stage2_steps, weights=lm,
                                      extra=heldout))
    result = evaluate(demo, stage2, shards)
    result["probes"] = probe(demo, stage2, shards)
    describe(demo, stage2)
    run_id = json.loads(Path(stage2, "mlflow_run.json").read_text())
    if demo.register:
        register(demo, stage2, result, run_id)
    print(f"MLflow: {run_id['tracking_uri']} (run {run_id['run_id']}); "
          f"browse with: .venv/bin/mlflow ui --backend-store-uri {run_id['tracking_uri']}")
    print(f"report: {Path(demo.out, 'eval', 'report.md')}")
    print(summary_line(result))  # held-out mean AU F1: <model> (best constant caption: <baseline>)
    return result
