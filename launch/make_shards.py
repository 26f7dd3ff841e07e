"""Turn a source (the synthetic-face world or a public dataset) into WebDataset shards + manifest on any URL.

    python launch/make_shards.py synthetic --out demo/shards/train --samples 4000 --seed 0
    python launch/make_shards.py synthetic --out demo/shards/test --samples 300 --split test
    python launch/make_shards.py synthetic --out s3://bucket/synthetic/train --samples 100000

Public datasets (layouts and split rules: docs/datasets.md):

    python launch/make_shards.py rafdb --root data/RAF-DB --out shards/rafdb/train --split train
    python launch/make_shards.py bp4d --root data/BP4D --out shards/bp4d/train --split train
    python launch/make_shards.py bp4d --root data/BP4D --out shards/bp4d/test --split test --no-subsample
    python launch/make_shards.py disfa --root data/DISFA --out shards/disfa/test --split test \\
        --test-subjects SN001,SN002,SN009 --no-subsample
"""

from __future__ import annotations

import argparse
import sys

from expblip.cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="synthetic, bp4d, disfa, gft, raf_au, emotionet, affectnet, rafdb, "
                        "rafdb_compound or faceme")
    parser.add_argument("--out", required=True, help="output directory or URL (file://, s3://)")
    parser.add_argument("--root", default="", help="dataset root directory (real datasets)")
    parser.add_argument("--samples", type=int, default=1000, help="synthetic: number of faces")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: the faces drawn")
    parser.add_argument("--split", default="train", choices=["train", "test", "all"],
                        help="synthetic: different faces per split; real datasets: the official split where one "
                        "exists, else the documented subject/image rule")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic: image side in pixels")
    parser.add_argument("--caption-style", default="auto", choices=["auto", "au", "emotion", "concat"],
                        help="auto: au for AU datasets (and synthetic), emotion for emotion datasets")
    parser.add_argument("--subsample", action=argparse.BooleanOptionalAction, default=True,
                        help="video datasets: every 10th frame plus label changes (the paper's train sets); "
                        "--no-subsample keeps every frame (the paper's test sets)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="datasets without an official split: fraction of subjects/images held out "
                        "(default per dataset, see docs/datasets.md)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the subject/image split rule")
    parser.add_argument("--test-subjects", default=None,
                        help="video datasets: test subject ids, comma-separated or a file with one per line")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    def go() -> None:
        from expblip.data.captions import CaptionConfig
        from expblip.data.shards import write_shards
        from expblip.data.sources import default_caption_style, records

        style = default_caption_style(args.source) if args.caption_style == "auto" else args.caption_style
        opts = dict(split=args.split, caption=CaptionConfig(style=style))
        if args.source == "synthetic":
            opts.update(samples=args.samples, seed=args.seed, image_size=args.image_size, root=args.root)
        else:
            opts.update(root=args.root, subsample=args.subsample, split_seed=args.split_seed)
            if args.test_fraction is not None:
                opts["test_fraction"] = args.test_fraction
            if args.test_subjects is not None:
                opts["test_subjects"] = args.test_subjects
        meta = {"source": args.source, **{k: v for k, v in opts.items() if k != "caption"}, "caption_style": style}
        manifest = write_shards(records(args.source, **opts), args.out, samples_per_shard=args.samples_per_shard,
                                meta=meta)
        print(f"[expblip] {sum(s['samples'] for s in manifest['shards'])} samples in {len(manifest['shards'])} shards at {args.out}")

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
