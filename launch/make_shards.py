"""Turn a source (the synthetic-face world or a public dataset) into WebDataset shards + manifest on any URL.

    python launch/make_shards.py synthetic --out demo/shards/train --samples 4000 --seed 0
    python launch/make_shards.py synthetic --out demo/shards/test --samples 300 --split test
    python launch/make_shards.py synthetic --out s3://bucket/synthetic/train --samples 100000
"""

from __future__ import annotations

import argparse
import sys

from expblip.cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="synthetic (or a dataset name)")
    parser.add_argument("--out", required=True, help="output directory or URL (file://, s3://)")
    parser.add_argument("--root", default="", help="dataset root directory (real datasets)")
    parser.add_argument("--samples", type=int, default=1000, help="synthetic: number of faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="synthetic: train or test (different faces)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--caption-style", default="au", choices=["au", "emotion", "concat"])
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    def go() -> None:
        from expblip.data.captions import CaptionConfig
        from expblip.data.shards import write_shards
        from expblip.data.sources import records

        opts = dict(samples=args.samples, seed=args.seed, split=args.split, image_size=args.image_size,
                    root=args.root, caption=CaptionConfig(style=args.caption_style))
        meta = {"source": args.source, **{k: v for k, v in opts.items() if k != "caption"},
                "caption_style": args.caption_style}
        manifest = write_shards(records(args.source, **opts), args.out, samples_per_shard=args.samples_per_shard,
                                meta=meta)
        print(f"[expblip] {sum(s['samples'] for s in manifest['shards'])} samples in {len(manifest['shards'])} shards at {args.out}")

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
