"""Export a training checkpoint as an HF-format BLIP-2 directory (CPU only, no process group, no GPU).

    # newest checkpoint of a run -> a directory that stock transformers loads
    python launch/export.py --checkpoint runs/stage2 --out exports/stage2
    # one checkpoint, 16-bit weights (the Q-Former and query tokens stay fp32, as transformers keeps them)
    python launch/export.py --checkpoint runs/stage2/checkpoints/step00000100 --out exports/stage2-bf16 --dtype bfloat16
    # small export: Q-Former, query tokens, projection (+ ViT if it trained) + fingerprints of the frozen towers
    python launch/export.py --checkpoint runs/stage2 --out exports/stage2-small --trainable-only
    # ... and back to a full export on the towers it was trained on (refused if they differ)
    python launch/export.py --merge exports/stage2-small --towers exports/initial --out exports/stage2-full
    # into the MLflow Model Registry (a new version of the named model, tagged with its run's eval.* metrics)
    python launch/export.py --checkpoint runs/stage2 --out exports/stage2 --register expblip-faces
    python launch/export.py --export runs/stage2/export --register expblip-faces --tracking-uri http://127.0.0.1:5000

The full export loads without expblip: Blip2Processor.from_pretrained("exports/stage2") (image size, CLIP mean/std,
bicubic, query tokens, chat template) + Blip2ForConditionalGeneration.from_pretrained("exports/stage2") (its
generation_config.json: 5 beams, the caption end token), or pipeline("image-text-to-text", model="exports/stage2").
A registered model loads with mlflow.pyfunc.load_model("models:/expblip-faces/1").predict([image_bytes, ...]).
Memory: the consolidated state of the checkpoint (frozen towers as stored + trainable weights in fp32) plus one
output shard (5 GB) at a time. A missing checkpoint, config or tokenizer prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory (newest checkpoint), its checkpoints/ or one stepNNNNNNNN")
    source.add_argument("--merge", help="a trainable-only export to merge onto --towers")
    source.add_argument("--export", help="an existing full export (or RUN_DIR) to register (with --register)")
    parser.add_argument("--out", help="output directory (not with --export)")
    parser.add_argument("--register", default="", metavar="NAME",
                        help="register the export as a new version of this MLflow model (pyfunc over the captioner)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow server for --register (default: $MLFLOW_TRACKING_URI, else the training run's)")
    parser.add_argument("--trainable-only", action="store_true",
                        help="write only the trained tensors + sha256 fingerprints of the frozen towers")
    parser.add_argument("--towers", default="",
                        help="with --merge: HF-format dir (or LAVIS .pth) holding the frozen towers (model.weights)")
    parser.add_argument("--vision-weights", default="",
                        help="with --merge: the run's model.vision_weights (the ViT from its own source)")
    parser.add_argument("--lm-weights", default="",
                        help="with --merge: the run's model.lm_weights (the LM's own HF directory)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights of a full export (default: float32, what the checkpoint holds)")
    parser.add_argument("--tokenizer", default="", help="tokenizer directory, if not found beside the run")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="with --merge: let a .pth/.bin tower file hold arbitrary pickles (trusted files only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    args = parser.parse_args(argv)
    if args.export and not args.register:
        parser.error("--export names an export to register: add --register NAME")
    if not args.export and not args.out:
        parser.error("--out is required with --checkpoint and --merge")
    if args.merge and not (args.towers or args.vision_weights or args.lm_weights):
        parser.error("--merge needs --towers (and/or --vision-weights / --lm-weights, as the run had them)")
    if args.merge and args.trainable_only:
        parser.error("--trainable-only goes with --checkpoint, not --merge")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = args.export or write_export(args)
        if args.register:
            register(out, args.register, args.tracking_uri)
    except (OSError, ValueError) as err:  # missing files, tower mismatches, config errors: all name the path
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def write_export(args: argparse.Namespace) -> str:
    """--checkpoint or --merge: write the export to --out and say what was written."""
    from expblip.train.export import export_checkpoint, merge_export

    if args.merge:
        out = merge_export(args.merge, args.towers, args.out, args.dtype, args.allow_pickle, args.overwrite,
                           args.vision_weights, args.lm_weights)
        from expblip.model.weights import towers_label

        towers = towers_label(args.towers, args.vision_weights, args.lm_weights)
        print(f"[expblip] merged {args.merge} onto the towers of {towers}: {out}")
        return args.out
    result = export_checkpoint(args.checkpoint, args.out, args.trainable_only, args.dtype, args.tokenizer,
                               args.overwrite)
    kind = "trainable-only export" if result.trainable_only else "export"
    print(f"[expblip] {kind} of {result.checkpoint} (step {result.step}, {result.tensors} tensors): {result.out}")
    if result.heads:  # stage-1 ITC/ITM/ITG heads, the vision stage's probe: training-only, as in RUN_DIR/export
        print(f"[expblip] not exported: {len(result.heads)} stage-head tensors ({', '.join(result.heads[:4])} ...)")
    return args.out


def register(export: str, name: str, tracking_uri: str) -> None:
    from mlflow.exceptions import MlflowException

    from expblip.train.registry import register_export

    try:
        done = register_export(export, name, tracking_uri)
    except MlflowException as err:  # an unreachable server, a refused name: one line, not a traceback
        raise ValueError(f"MLflow refused to register {export} as {name!r}: {err}") from err
    evals = {k: v for k, v in done.tags.items() if k.startswith("eval.")}
    shown = ", ".join(f"{k}={evals[k]}" for k in ("eval.au_f1", "eval.emotion_accuracy") if k in evals)
    summary = f"{len(evals)} eval.* tags ({shown})" if evals else "no eval.* tags (no evaluated training run)"
    print(f"[expblip] registered {export} as {done.model_uri} (run {done.run_id}); {summary}")


if __name__ == "__main__":
    sys.exit(main())
