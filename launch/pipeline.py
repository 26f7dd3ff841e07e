"""Run a recipe chain end to end; stages whose outputs exist are skipped.

    python launch/pipeline.py --recipe demo                      # the synthetic-face demo (make demo)
    python launch/pipeline.py --recipe demo --stage2-steps 300   # a quicker, weaker demo
    python launch/pipeline.py --recipe demo --register expblip-demo   # + the MLflow Model Registry (demo/mlflow.db)

The paper's chain (recipes/{exp_blip,au_blip,emot_blip,cat_blip,mix_blip}.yaml; expblip.pipeline.chain), on CPU:
    python launch/pipeline.py --recipe exp_blip --out runs/pipeline --steps-scale 0.25      # about 4x quicker
    python launch/pipeline.py --recipe exp_blip --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct
    python launch/pipeline.py --recipe mix_blip init=lm world.au_samples=1000 train.blip_stages=[stage2]
    python launch/pipeline.py --recipe exp_qwen_vl --out runs/pipeline    # Qwen2.5-VL in Exp-BLIP's place (same --out:
                                                                           # the chain up to the fused captions is reused)
    ray job submit --address http://HEAD:8265 --working-dir . -- python launch/pipeline.py --recipe exp_blip \\
        --out /shared/expblip                                  # an absolute --out: the job runs in a copied directory
Re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from expblip.cli import run_main
from expblip.pipeline.demo import DemoConfig
from expblip.pipeline.recipe import NAMED_RECIPES

DEMO = DemoConfig()  # the demo flags default to its sizes



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo", metavar="NAME|YAML",
                        help=f"demo, a pipeline recipe ({', '.join(NAMED_RECIPES)}) or a pipeline recipe's YAML file")
    parser.add_argument("--out", default=None,
                        help="directory for shards, runs, MLflow store and reports (demo: 'demo'; else the recipe's)")
    parser.add_argument("--train-samples", type=int, default=DEMO.train_samples, help="demo only")
    parser.add_argument("--vision-steps", type=int, default=DEMO.vision_steps, help="demo only")
    parser.add_argument("--lm-steps", type=int, default=DEMO.lm_steps, help="demo only")
    parser.add_argument("--stage2-steps", type=int, default=DEMO.stage2_steps, help="demo only")
    parser.add_argument("--register", default="", metavar="NAME",
                        help="demo only: log the evaluation into the stage-2 run and register its export in MLflow")
    parser.add_argument("--llm-url", default="", help="OpenAI-compatible endpoint for the paper's LLM fusion")
    parser.add_argument("--llm-model", default="", help="model name the --llm-url server knows")
    parser.add_argument("--steps-scale", type=float, default=None, help="multiply every stage's training steps")
    parser.add_argument("--init", choices=["au_blip", "emot_blip", "lm"], help="what Exp-, Cat- and Mix-BLIP start from")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own console output of every stage")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="pipeline recipes: run training seeds 0..N-1 (OUT/seedK each; the same world) and "
                        "report mean ± SD and each comparison's interval per seed (OUT/seeds.md)")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. world.au_samples=500 init=lm")
    args = parser.parse_args(argv)
    if args.register and args.recipe != "demo":
        parser.error("--register applies to the demo; register a pipeline's export with launch/export.py --export "
                     "RUN_DIR --register NAME")
    if args.recipe != "demo" and args.recipe not in NAMED_RECIPES and not args.recipe.endswith((".yaml", ".yml")):
        parser.error(f"--recipe {args.recipe!r}: give demo, one of {', '.join(NAMED_RECIPES)}, or a recipe's YAML file")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.recipe == "demo":
        if args.overrides or args.llm_url or args.steps_scale is not None or args.init or args.seeds != 1:
            parser.error("--llm-url, --steps-scale, --init, --seeds and overrides apply to the pipeline recipes, "
                         "not to demo (the demo is one seed)")
        return run_main(lambda: _demo(args))
    return run_main(lambda: _pipeline(args))


def _demo(args: argparse.Namespace) -> None:
    from expblip.pipeline.demo import run_demo

    run_demo(DemoConfig(out=args.out or "demo", train_samples=args.train_samples, vision_steps=args.vision_steps,
                        lm_steps=args.lm_steps, stage2_steps=args.stage2_steps, verbose=args.verbose,
                        register=args.register))


def _pipeline(args: argparse.Namespace) -> None:
    from expblip.pipeline.chain import run_pipeline
    from expblip.pipeline.recipe import load_recipe

    flags = [f"out={args.out}"] if args.out else []
    if args.llm_url:
        flags += [f"fusion.llm.url={args.llm_url}", f"fusion.llm.model={args.llm_model}"]
    if args.steps_scale is not None:
        flags.append(f"steps_scale={args.steps_scale}")
    if args.init:
        flags.append(f"init={args.init}")
    if args.verbose:
        flags.append("verbose=true")
    recipe = load_recipe(args.recipe, [*flags, *args.overrides])
    if args.seeds == 1:
        run_pipeline(recipe)
        return
    _seeds(args, recipe, [*flags, *args.overrides])


def _seeds(args: argparse.Namespace, recipe, overrides: list[str]) -> None:
    from pathlib import Path

    from expblip.pipeline.chain import run_pipeline, say
    from expblip.pipeline.recipe import load_recipe
    from expblip.pipeline.seeds import summarise

    base = Path(recipe.out)
    results = [run_pipeline(load_recipe(args.recipe, [*overrides, f"out={base / f'seed{k}'}", f"train.seed={k}"]))
               for k in range(args.seeds)]
    summary = summarise(results)
    (base / "seeds.md").write_text(summary["table"] + "\n")
    print("\n" + summary["table"] + "\n", flush=True)
    say(f"seeds: {base / 'seeds.md'}")


if __name__ == "__main__":
    sys.exit(main())
