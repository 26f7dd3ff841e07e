"""Write a synthetic stand-in for BP4D or DISFA, laid out exactly like the real dataset (expblip.data.standin).

    # every subject of the field's folds, 10 frames each, then the fold shards and the protocol
    python launch/make_standin.py bp4d --root standin/BP4D --frames 10
    python launch/make_shards.py bp4d --root standin/BP4D --out shards/bp4d/fold1/test --split test --fold 1 \\
        --folds 3 --no-subsample
    # DISFA with frames numbered from 0, as ME-GraphAU extracts them (img/SN001/0.png)
    python launch/make_standin.py disfa --root standin/DISFA --frame-base 0

Faces are drawn by the synthetic-face world from their labels: numbers measured on a stand-in show that the
protocol runs, never how a model does on the real dataset (the tree holds a STANDIN.txt saying so).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["bp4d", "disfa"])
    parser.add_argument("--root", required=True, help="folder to write the stand-in into")
    parser.add_argument("--frames", type=int, default=10, help="labelled frames per subject (and BP4D task)")
    parser.add_argument("--tasks", type=int, default=1, help="BP4D: tasks T1..Tn per subject")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame-base", type=int, default=1, choices=[0, 1],
                        help="DISFA: 1 = Images_LeftCamera/SN001/00001.jpg, 0 = img/SN001/0.png (ME-GraphAU)")
    args = parser.parse_args(argv)
    from expblip.data.standin import StandinConfig, write_standin

    root = write_standin(StandinConfig(args.dataset, args.root, args.frames, args.tasks, (), args.image_size,
                                       args.seed, args.frame_base))
    print(f"[expblip] {args.dataset} stand-in at {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
