"""Serve an exported Exp-BLIP model over HTTP: a browser page, a JSON API and an OpenAI-compatible API
(expblip.serve.app). Concurrent requests are captioned together in batches.

    # CPU, a run directory (its export/ is used); open http://127.0.0.1:8000 in a browser
    python launch/serve.py --model runs/stage2
    # whole photos rather than face crops: describe the square around the largest face (per video frame too)
    python launch/serve.py --model runs/stage2/export --crop-face
    # from the command line
    curl -F image=@face.jpg http://127.0.0.1:8000/describe
    curl -F video=@clip.mp4 'http://127.0.0.1:8000/describe/video?fps=2'
    curl http://127.0.0.1:8000/metrics
    # the OpenAI API (openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)), guarded by a key
    EXPBLIP_API_KEY=secret python launch/serve.py --model runs/stage2 --model-name expblip-s2
    # GPU, reachable from other machines: set a key (or put it behind a proxy that authenticates)
    python launch/serve.py --model runs/stage2 --device cuda --host 0.0.0.0 --port 8080 --api-key "$KEY" --max-batch 64

POST /describe answers {"caption", "aus": [{"au", "name"}], "emotions", "face", "crop", "image"}; errors are
{"error": "..."} with 400 (no file), 401 (no or wrong key), 413 (too large), 415 (not an image), 422 (corrupt),
503 + Retry-After (queue full), 504 (timed out). A missing or invalid model directory prints one line naming it and
exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from expblip.serve import API_KEY_ENV
from expblip.serve.options import ServeOptions

DEFAULTS = ServeOptions(model="")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--crop-face", action="store_true",
                        help="describe the square around the largest detected face (centre square if none)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                        help="largest accepted image upload in MiB")
    parser.add_argument("--max-video-mb", type=float, default=d.max_video_mb, help="largest accepted video upload in MiB")
    parser.add_argument("--fps", dest="video_fps", type=float, default=d.video_fps,
                        help=f"video frames sampled per second (default: {d.video_fps:g})")
    parser.add_argument("--max-frames", type=int, default=d.max_frames, help="most frames sampled from one video")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds, help="longest accepted video, in seconds")
    parser.add_argument("--beams", type=int, default=d.beams,
                        help=f"beam width for beam search (default: {d.beams}, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="caption length limit in tokens")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help="images captioned together in one generate call")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                        help="how long the first queued image waits for others to share its batch "
                             f"(default: {d.max_wait_ms:g}; only under load or while requests arrive)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="images that may wait; beyond that requests get 503 + Retry-After")
    parser.add_argument("--timeout", dest="request_timeout_s", type=float, default=d.request_timeout_s,
                        help="seconds before a request gets 504")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""),
                        help=f"bearer token for /describe*, /v1/* and /metrics (default: ${API_KEY_ENV}; none: open)")
    parser.add_argument("--model-name", default="", help="the model id of /v1/models (default: the directory name)")
    parser.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default=d.dtype, choices=["bf16", "fp16", "fp32"],
                        help="weights and compute dtype (bf16 halves memory; the Q-Former stays fp32)")
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> ServeOptions:
    """The command line as ServeOptions (each option's dest is the field's name)."""
    return ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from expblip.serve.app import app_for_export

    try:
        app = app_for_export(options(args), api_key=args.api_key or None)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    auth = "API key required" if args.api_key else "no API key"
    print(f"expblip: serving {args.model} on http://{args.host}:{args.port} ({auth}; batches of up to "
          f"{args.max_batch}, {args.max_wait_ms:g} ms wait)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
