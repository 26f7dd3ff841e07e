"""Describe face images and video clips in words with an exported Exp-BLIP model: one line per image (or per sampled
video frame), or JSON lines.

    # CPU, a run directory (its export/ is used) and a folder of faces
    python launch/describe.py --model runs/stage2 demo/faces/ face.png
    # JSON lines, nucleus sampling instead of beam search
    python launch/describe.py --model runs/stage2/export face.png --json --sample
    # whole photos: describe the square around the largest face (adds [face: x,y WxH] or "none found")
    python launch/describe.py --model runs/stage2 --crop-face photos/
    # GPU, wider beams
    python launch/describe.py --model runs/stage2 --device cuda --beams 8 --batch-size 64 demo/faces/
    # a video: 2 frames per second, each cut to its face; frames.json, frames.csv and timeline.png go to clip-expblip/
    python launch/describe.py --model runs/stage2 clip.mp4 --fps 2 --crop-face --out clip-expblip
    # a task-prompted model: ask one of its tasks (its trained prompt), or any instruction
    python launch/describe.py --model runs/tasks --task aus face.png
    python launch/describe.py --model runs/tasks --prompt "Name the emotion." face.png

Each line reads ``path: caption  [AUs: 1, 2, 12] [emotion: happiness]``; AUs and emotions are parsed from the
caption (expblip.infer.parse); a video frame's line starts ``clip.mp4@1.50s``. Videos (mp4, m4v, mov, mkv, webm, avi)
are decoded with PyAV and refused above --max-frames sampled frames or --max-seconds. A missing model directory, a
missing image or a file that is not an image or video prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("images", nargs="+", help="image files (jpg/jpeg/png/bmp/webp), directories of them, and "
                                                  "video clips (mp4/m4v/mov/mkv/webm/avi)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--task", default="", help="ask one of the tasks the model was trained on (describe, aus, "
                                                   "emotion: their prompts are in the export's expblip.json)")
    parser.add_argument("--prompt", default="", help="an instruction of your own, laid out as the LM family's turn "
                                                     "(default: none, the paper's captioning)")
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
    parser.add_argument("--fps", type=float, default=2.0, help="video: frames sampled per second (default: 2)")
    parser.add_argument("--max-frames", type=int, default=240, help="video: most frames sampled from one clip")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="video: longest accepted clip, in seconds")
    parser.add_argument("--out", default="", help="video: directory for frames.json, frames.csv and timeline.png "
                                                  "(default: ./<clip name>-expblip; one subdirectory per clip if several)")
    return parser.parse_args(argv)


def describe_videos(captioner, videos: list[str], args: argparse.Namespace, gen, prompt: str = "") -> None:
    """Per-frame lines on stdout, then frames.json, frames.csv and timeline.png per clip (their paths on stderr)."""
    from expblip.infer.captioner import format_description
    from expblip.infer.video import VideoLimits, describe_video_file, write_outputs

    limits = VideoLimits(args.max_frames, args.max_seconds)
    for clip in videos:
        rows = describe_video_file(captioner, clip, args.fps, args.crop_face, gen, args.batch_size, limits,
                                   prompt=prompt)
        for row in rows:
            line = {k: v for k, v in row.items() if k not in ("frame", "time")}
            label = f"{clip}@{row['time']:.2f}s"
            print(format_description(label, {**line, "time": row["time"]} if args.json else line,
                                     as_json=args.json), flush=True)
        out = Path(args.out or f"{Path(clip).stem}-expblip")
        out = out / Path(clip).stem if args.out and len(videos) > 1 else out
        paths = write_outputs(rows, out, title=f"{Path(clip).name}: AU activation ({len(rows)} frames)")
        print(f"[expblip] {clip}: {len(rows)} frames -> {', '.join(str(p) for p in paths.values())}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from expblip.infer.captioner import Captioner, describe_files, format_description, list_images, resolve_export
    from expblip.infer.video import is_video
    from expblip.model.generation import GenerationConfig

    gen = GenerationConfig(num_beams=args.beams, sample=args.sample, max_new_tokens=args.max_new_tokens)
    videos = [p for p in args.images if is_video(p) and Path(p).is_file()]
    images = [p for p in args.images if p not in videos]
    try:
        export = resolve_export(args.model)
        if images:
            list_images(images)  # report a missing path before the model loads
        captioner = Captioner.from_export(export, device=args.device, dtype=args.dtype)
        if args.task and args.prompt:
            raise ValueError("give --task or --prompt, not both")
        prompt = captioner.task_prompt(args.task) if args.task else args.prompt
        torch.manual_seed(args.seed)
        if images:
            for path, description in describe_files(captioner, images, gen, args.batch_size, args.crop_face, prompt):
                print(format_description(path, description, as_json=args.json), flush=True)
        describe_videos(captioner, videos, args, gen, prompt)
    except (OSError, ValueError) as err:  # FileNotFoundError, ImageError: both name the path
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
