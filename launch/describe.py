"""Describe face images in words with an exported Exp-BLIP model: one line per image, or JSON lines.

    # CPU, a run directory (its export/ is used) and a folder of faces
    python launch/describe.py --model runs/stage2 demo/faces/ face.png
    # JSON lines, nucleus sampling instead of beam search
    python launch/describe.py --model runs/stage2/export face.png --json --sample
    # whole photos: describe the square around the largest face (adds [face: x,y WxH] or "none found")
    python launch/describe.py --model runs/stage2 --crop-face photos/
    # GPU, wider beams
    python launch/describe.py --model runs/stage2 --device cuda --beams 8 --batch-size 64 demo/faces/

Each line reads ``path: caption  [AUs: 1, 2, 12] [emotion: happiness]``; AUs and emotions are parsed from the
caption (expblip.infer.parse). A missing model directory, a missing image or a file that is not an image prints one
line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("images", nargs="+", help="image files (jpg/jpeg/png/bmp/webp) and directories of them")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling (top_p 0.9) instead of beam search")
    parser.add_argument("--beams", type=int, default=5, help="beam width for beam search (default: 5, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned together")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="weights and compute dtype (bf16 halves memory; the Q-Former stays fp32)")
    parser.add_argument("--crop-face", action="store_true",
                        help="describe the square around the largest detected face (centre square if none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from expblip.infer.captioner import Captioner, describe_files, format_description, list_images, resolve_export
    from expblip.model.blip2 import GenerationConfig

    gen = GenerationConfig(num_beams=args.beams, sample=args.sample, max_new_tokens=args.max_new_tokens)
    try:
        export = resolve_export(args.model)
        list_images(args.images)  # report a missing path before the model loads
        captioner = Captioner.from_export(export, device=args.device, dtype=args.dtype)
        torch.manual_seed(args.seed)
        for path, description in describe_files(captioner, args.images, gen, args.batch_size, args.crop_face):
            print(format_description(path, description, as_json=args.json), flush=True)
    except (OSError, ValueError) as err:  # FileNotFoundError, ImageError: both name the path
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
