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

Your own faces: a label table (CSV, TSV, XLSX, JSONL or parquet) with one row per image; its columns are found by
their names (image, aus or AU01..., emotion, caption, subject, frame, split) or named by the --*-column options
(docs/datasets.md, "Your own table"):

    python launch/make_shards.py table --table faces.csv --root faces/ --check 100   # reads, counts, writes nothing
    python launch/make_shards.py table --table faces.csv --root faces/ --out shards/faces/train
    python launch/make_shards.py table --table openface.csv --root frames/ --au-threshold 2 --ignore-columns AU45_r \\
        --out shards/mine/train
    python launch/make_shards.py table --table fer.parquet --emotion-map affectnet --out s3://bucket/fer/train
    # 8 processes read, check, resize and encode: the same shards and manifest as one process
    python launch/make_shards.py table --table faces.csv --root faces/ --resize 256 --workers 8 --out shards/faces/train
    # the same on a Ray cluster's CPUs (Ray tasks encode, this process writes the same bytes)
    python launch/make_shards.py table --table s3://lab/faces.csv --root s3://lab/faces/ --ray auto --out s3://lab/shards/train

A video run through OpenFace 2.0 or py-feat: its per-frame CSV plus the video (or its frames); the tool's AUs (and
py-feat's emotions with --emotions) become pseudo-labels, marked so in the manifest (docs/datasets.md):

    python launch/make_shards.py openface --csv processed/clip.csv --frames processed/clip_aligned --out shards/clip
    python launch/make_shards.py pyfeat --csv clip_fex.csv --video clip.mp4 --fps 2 --sample label-change --emotions \\
        --out shards/clip

Instruction data (LLaVA or ShareGPT JSON: each human/gpt exchange becomes a prompt + answer sample) and Hugging Face
`datasets` folders (save_to_disk, imagefolder, parquet; columns as for a table), docs/datasets.md:

    python launch/make_shards.py llava --json faces_instruct.json --root images/ --out shards/instruct/train
    python launch/make_shards.py llava --json chats.jsonl --multi-turn refuse --check 100
    python launch/make_shards.py hf --dataset my_faces_saved/ --emotion-column label --out shards/hf/train

--check [N] works for every source: it reads the first N rows (all without N), writes nothing, prints the usable
rows, each kind of skipped row and three example records, and exits 2 when the conversion would fail.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expblip.data.sources.convert import ConvertRequest


def _frame_base(text: str) -> int | None:
    if text not in ("auto", "0", "1"):
        raise argparse.ArgumentTypeError(f"expected auto, 0 or 1, got {text!r}")
    return None if text == "auto" else int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="synthetic, bp4d, disfa, gft, raf_au, emotionet, affectnet, rafdb, "
                   "rafdb_compound, faceme, table (your own label table), openface or pyfeat (a video's per-frame "
                   "CSV from the tool), llava (LLaVA / ShareGPT instruction JSON) or hf (a Hugging Face datasets "
                   "folder or parquet)")
    p.add_argument("--out", default="", help="output directory or URL (file://, s3://); required unless --check")
    p.add_argument("--check", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="read the first N rows (all without N), write nothing, report usable and skipped rows and "
                   "three example records; exit 2 when the conversion would fail")
    p.add_argument("--root", default="", help="dataset root directory (real datasets)")
    p.add_argument("--samples", type=int, default=1000, help="synthetic: number of faces")
    p.add_argument("--seed", type=int, default=0, help="synthetic: the faces drawn")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="synthetic: different faces per split (the split's name seeds every face: val, test and "
                   "train are drawn apart); real datasets: the official split where one exists, else the fold / "
                   "documented subject or image rule; val (with --val-fraction) is carved out of the training part")
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
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="real datasets: this share of the training part's subjects (images where there are none) "
                   "is the validation split: --split val writes them, --split train (same F and --split-seed) "
                   "leaves them out; the manifest records the rule")
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
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes that read, check, resize and encode the images (e.g. the machine's cores); the "
                   "same shards and manifest as one process, memory bounded (default 1: this process alone)")
    p.add_argument("--ray", default="", metavar="ADDRESS",
                   help="encode on a Ray cluster instead: its tasks read, check, resize and encode the images, this "
                   "process writes the shards (the same bytes as a local run); ADDRESS as ray.init takes it: auto, "
                   "HOST:6379, ray://HOST:10001, or local. Images must be readable from every node (shared disk, s3://)")
    _table_options(p.add_argument_group("table source (your own label table; columns found by name unless given)"))
    _tool_options(p.add_argument_group("openface and pyfeat sources (a video's per-frame CSV from the tool; "
                                       "--au-threshold and --name serve them too)"))
    _instruct_options(p.add_argument_group("llava and hf sources (instruction JSON; a Hugging Face datasets folder, "
                                           "read with the table source's column options)"))
    return p


# make_shards option → TableOptions field; every default None (= found by name, or the TableOptions default)
TABLE_OPTIONS = ("table", "image_column", "aus_column", "emotion_column", "caption_column", "subject_column",
                 "frame_column", "split_column", "au_threshold", "emotion_map", "ignore_columns", "name")


def _table_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--table", metavar="FILE", help="the label table: .csv, .tsv, .xlsx, .jsonl or .parquet (local or s3://); image "
                   "paths in it are relative to --root (default: the table's folder)")
    g.add_argument("--image-column", metavar="COL", help="image paths (default: image, path, file, filename, img or url)")
    g.add_argument("--aus-column", metavar="COL", help="AU lists like '1,2,12' (default: aus, au or action_units); without one, "
                   "one column per AU (AU01, AU1, au_1, AU01_c) is read")
    g.add_argument("--emotion-column", metavar="COL", help="emotion names or codes (default: emotion, emotions or expression)")
    g.add_argument("--caption-column", metavar="COL", help="given captions, several comma-separated (default: caption, captions, "
                   "text or description); rows without one get captions from their labels")
    g.add_argument("--subject-column", metavar="COL", help="subject ids (default: subject, subject_id, participant or person)")
    g.add_argument("--frame-column", metavar="COL", help="frame numbers (default: frame, frame_id or frame_number)")
    g.add_argument("--split-column", metavar="COL", help="train/test per row (default: split, partition or subset); without one, "
                   "--test-fraction splits by subject (or image)")
    g.add_argument("--au-threshold", type=float, metavar="T", help="per-AU columns hold intensities: an AU is present when >= "
                   "this (DISFA: 2); without it they must be 0 or 1")
    g.add_argument("--emotion-map", metavar="FILE", help="emotion codes to names: a file of 'code,name' lines or a JSON object, or "
                   "affectnet / rafdb_basic")
    g.add_argument("--ignore-columns", metavar="COLS", help="comma-separated columns never read as labels (e.g. AU45_c)")
    g.add_argument("--name", help="the dataset name in labels and record keys (default: table)")


# make_shards option → ToolOptions field (with au_threshold and name, shared with the table source)
TOOL_OPTIONS = ("csv", "video", "frames", "fps", "sample", "min_confidence", "emotions", "video_fps")


def _tool_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--csv", metavar="FILE", help="the CSV OpenFace's FeatureExtraction or py-feat's detector wrote for "
                   "one video (docs/datasets.md, 'OpenFace and py-feat CSVs')")
    g.add_argument("--video", metavar="FILE", help="the video it describes: frames decoded with PyAV")
    g.add_argument("--frames", metavar="DIR", help="or its frames: OpenFace's <video>_aligned folder "
                   "(frame_det_00_000001.bmp) or numbered images (frame_000001.jpg)")
    g.add_argument("--fps", type=float, metavar="F", help="keep the first usable frame at or after each multiple of "
                   "1/F seconds (default: every usable frame)")
    g.add_argument("--sample", choices=["all", "label-change"], help="label-change: keep the first frame and each "
                   "whose labels differ from the previous one's (with --fps: either rule keeps a frame)")
    g.add_argument("--min-confidence", type=float, metavar="S", help="frames the tool is less sure of are skipped "
                   "and counted: OpenFace confidence (default 0.8; success 0 always), py-feat FaceScore (default 0.5)")
    g.add_argument("--emotions", action="store_true", default=None, help="pyfeat: label each frame with its most "
                   "probable emotion (anger ... neutral) too")
    g.add_argument("--video-fps", type=float, metavar="R", help="pyfeat with --frames and --fps: the video's frame "
                   "rate (read from --video otherwise)")


# make_shards option → LlavaOptions field (--name too)
LLAVA_OPTIONS = ("json", "multi_turn")


def _instruct_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--json", metavar="FILE", help="llava: a LLaVA (conversations from human/gpt) or ShareGPT "
                   "(messages + images) file, a .json array (streamed) or .jsonl; images relative to --root")
    g.add_argument("--multi-turn", choices=["split", "refuse"], help="llava: a record of several exchanges becomes "
                   "one sample per exchange on the same image (split, default) or stops the conversion (refuse)")
    g.add_argument("--dataset", metavar="PATH", help="hf: a datasets save_to_disk folder, an imagefolder with "
                   "metadata.jsonl, or parquet files with an image column (local; never the hub)")


def _check(request: ConvertRequest, rows: int) -> int:
    from expblip.data.sources.check import check

    report = check(request, rows)
    print("\n".join(report.lines()), flush=True)
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = vars(p.parse_args(argv))
    from expblip.data.sources.convert import ConvertRequest, convert, summary_line
    from expblip.data.sources.facetools import TOOL_SOURCES, ToolOptions
    from expblip.data.sources.llava import LlavaOptions
    from expblip.data.sources.table import TableOptions

    rows = args.pop("check")
    given = {k: v for k in TABLE_OPTIONS if (v := args.pop(k)) is not None}
    tools = {k: v for k in TOOL_OPTIONS if (v := args.pop(k)) is not None}
    if args["source"] in TOOL_SOURCES:  # --au-threshold and --name are theirs too
        tools.update({k: given.pop(k) for k in ("au_threshold", "name") if k in given})
    llava = {k: v for k in LLAVA_OPTIONS if (v := args.pop(k)) is not None}
    dataset = args.pop("dataset") or ""
    if args["source"] == "llava":  # --name is its own too
        llava.update({"name": given.pop("name")} if "name" in given else {})
    elif args["source"] == "hf":
        given.setdefault("name", "hf")
    if rows is None and not args["out"]:
        p.error("--out is required (or --check to read the source without writing)")
    try:
        table = TableOptions(**given) if given or args["source"] == "table" else None
        tool = ToolOptions(**tools) if tools or args["source"] in TOOL_SOURCES else None
        llava_options = LlavaOptions(**llava) if llava or args["source"] == "llava" else None
        request = ConvertRequest(**args, table_options=table, tool_options=tool, llava_options=llava_options,
                                 hf_dataset=dataset)
    except ValueError as err:
        p.error(str(err))
    if rows is not None:
        return _check(request, rows)
    try:
        manifest = convert(request)
    except (OSError, ValueError) as err:  # a missing file, a malformed label, a refused layout, a failed conversion
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(manifest, request.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
