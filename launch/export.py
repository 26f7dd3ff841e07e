"""Export a training checkpoint as an HF-format BLIP-2 directory (CPU only, no process group, no GPU).

    # newest checkpoint of a run -> a directory that stock transformers loads
    python launch/export.py --checkpoint runs/stage2 --out exports/stage2
    # one checkpoint, 16-bit weights (the Q-Former and query tokens stay fp32, as transformers keeps them)
    python launch/export.py --checkpoint runs/stage2/checkpoints/step00000100 --out exports/stage2-bf16 --dtype bfloat16
    # small export: Q-Former, query tokens, projection (+ ViT if it trained) + fingerprints of the frozen towers
    python launch/export.py --checkpoint runs/stage2 --out exports/stage2-small --trainable-only
    # ... and back to a full export on the towers it was trained on (refused if they differ)
    python launch/export.py --merge exports/stage2-small --towers exports/initial --out exports/stage2-full

The full export loads without expblip:
    Blip2ForConditionalGeneration.from_pretrained("exports/stage2"); AutoTokenizer.from_pretrained("exports/stage2")
and its expblip.json gives the preprocessing (bicubic resize to image_size, CLIP mean/std) and the caption end token.
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
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--trainable-only", action="store_true",
                        help="write only the trained tensors + sha256 fingerprints of the frozen towers")
    parser.add_argument("--towers", help="with --merge: HF-format dir (or LAVIS .pth) holding the frozen towers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights of a full export (default: float32, what the checkpoint holds)")
    parser.add_argument("--tokenizer", default="", help="tokenizer directory, if not found beside the run")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="with --merge: let a .pth/.bin tower file hold arbitrary pickles (trusted files only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    args = parser.parse_args(argv)
    if args.merge and not args.towers:
        parser.error("--merge needs --towers")
    if args.merge and args.trainable_only:
        parser.error("--trainable-only goes with --checkpoint, not --merge")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from expblip.train.export import export_checkpoint, merge_export

    try:
        if args.merge:
            out = merge_export(args.merge, args.towers, args.out, args.dtype, args.allow_pickle, args.overwrite)
            print(f"[expblip] merged {args.merge} onto the towers of {args.towers}: {out}")
            return 0
        result = export_checkpoint(args.checkpoint, args.out, args.trainable_only, args.dtype, args.tokenizer,
                                   args.overwrite)
    except (OSError, ValueError) as err:  # missing files, tower mismatches, config errors: all name the path
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = "trainable-only export" if result.trainable_only else "export"
    print(f"[expblip] {kind} of {result.checkpoint} (step {result.step}, {result.tensors} tensors): {result.out}")
    if result.heads:  # stage-1 ITC/ITM/ITG heads, the vision stage's probe: training-only, as in RUN_DIR/export
        print(f"[expblip] not exported: {len(result.heads)} stage-head tensors ({', '.join(result.heads[:4])} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
