"""Turn a source (the synthetic-face world or a public dataset) into WebDataset shards + manifest on any URL.

    python launch/make_shards.py synthetic --out demo/shards/train --samples 4000 --seed 0
    python launch/make_shards.py synthetic --out demo/shards/test --samples 300 --split test
    python launch/make_shards.py synthetic --out demo/shards/val --samples 300 --split val   # apart from both
    python launch/make_shards.py synthetic --out s3://bucket/synthetic/train --samples 100000

Public datasets (layouts, layout variants and split rules: docs/datasets.md):

    python launch/make_shards.py rafdb --root data/RAF-DB --out shards/rafdb/train --split train
    python launch/make_shards.py bp4d --root data/BP4D --out shards/bp4d/train --split train
    # the field's protocol: subject-exclusive fold K of 3 (JAA-Net / ME-GraphAU lists); fold 1 = the paper's test
    python launch/make_shards.py bp4d --root data/BP4D --out shards/bp4d/fold1/train --split train --fold 1 --folds 3
    python launch/make_shards.py bp4d --root data/BP4D --out shards/bp4d/fold1/test --split test --fold 1 --folds 3
    # frames extracted counting from 0 (ME-GraphAU, JAA-Net): detected per folder; --frame-base 0 forces it
    python launch/make_shards.py disfa --root data/DISFA --out shards/disfa/fold2/test --split test --fold 2 \\
        --folds 3 --frame-base 0

A video dataset's train split is subsampled (every 10th frame plus label changes) and its test split keeps every
frame, unless --subsample / --no-subsample says otherwise; the manifest records which (evaluate.py --protocol refuses
subsampled test shards).

A conversion that keeps no sample, or skips more than --max-skipped (default 1%) of its rows as bad data (missing
images, ...), prints the first skipped rows and exits 2 without a complete manifest. Rows a label rule leaves out
(a BP4D AU coded 9, AffectNet codes 8-10) never count against it.
"""

from __future__ import annotations

import argparse
import sys


def _frame_base(text: str) -> int | None:
    if text not in ("auto", "0", "1"):
        raise argparse.ArgumentTypeError(f"expected auto, 0 or 1, got {text!r}")
    return None if text == "auto" else int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="synthetic, bp4d, disfa, gft, raf_au, emotionet, affectnet, rafdb, "
                   "rafdb_compound or faceme")
    p.add_argument("--out", required=True, help="output directory or URL (file://, s3://)")
    p.add_argument("--root", default="", help="dataset root directory (real datasets)")
    p.add_argument("--samples", type=int, default=1000, help="synthetic: number of faces")
    p.add_argument("--seed", type=int, default=0, help="synthetic: the faces drawn")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="synthetic: different faces per split (the split's name seeds every face: val, test and "
                   "train are drawn apart); real datasets: the official split where one exists, else the fold / "
                   "documented subject or image rule (no val: see --split val's error)")
    p.add_argument("--image-size", type=int, default=64, help="synthetic: image side in pixels")
    p.add_argument("--caption-style", default="auto", choices=["auto", "au", "emotion", "concat"],
                   help="auto: au for AU datasets (and synthetic), emotion for emotion datasets")
    p.add_argument("--subsample", action=argparse.BooleanOptionalAction, default=None,
                   help="video datasets: every 10th frame plus label changes (the paper's train sets; default for "
                   "--split train and all); --no-subsample keeps every frame (the paper's and the protocol's test "
                   "sets; default for --split test). The manifest records which")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="datasets without an official split: fraction of subjects/images held out "
                   "(default per dataset, see docs/datasets.md)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the subject/image split rule")
    p.add_argument("--test-subjects", default=None,
                   help="video datasets: test subject ids, comma-separated or a file with one per line")
    p.add_argument("--fold", type=int, default=None, help="video datasets: this fold's subjects are the test split")
    p.add_argument("--folds", type=int, default=None,
                   help="number of folds; 3 uses the field's published subject lists for BP4D and DISFA")
    p.add_argument("--paper-split", action="store_true",
                   help="the paper's test subjects where they can be reconstructed (BP4D: fold 1's 13 subjects)")
    p.add_argument("--frame-base", type=_frame_base, default=None, metavar="{auto,0,1}",
                   help="video datasets: 1 = image N shows label frame N, 0 = image N shows label frame N+1 "
                   "(frames extracted counting from 0); auto (default) detects it per folder and refuses to guess")
    p.add_argument("--max-skipped", type=float, default=0.01,
                   help="fail when more than this fraction of rows is skipped as bad data (default 0.01)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--resize", type=int, default=0, metavar="S",
                   help="write images with their short side at most S pixels (bicubic; JPEG sources stay JPEG at "
                   "quality 95), so training decodes less: e.g. 256 for a 224-px model; 0 (default) keeps them")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = vars(p.parse_args(argv))
    if args["split"] == "val" and args["source"] != "synthetic":
        p.error(f"--split val is drawn by the synthetic world only; {args['source']} has no validation split yet: "
                "convert --split train and carve validation subjects out of it (a later step)")
    from expblip.data.sources.convert import ConvertRequest, convert, summary_line

    try:
        request = ConvertRequest(**args)
    except ValueError as err:
        p.error(str(err))
    try:
        manifest = convert(request)
    except (OSError, ValueError) as err:  # a missing file, a malformed label, a refused layout, a failed conversion
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(manifest, request.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
