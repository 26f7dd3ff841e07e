"""Serve an exported Exp-BLIP model over HTTP: a browser page and a JSON API (expblip.serve.app).

    # CPU, a run directory (its export/ is used); open http://127.0.0.1:8000 in a browser
    python launch/serve.py --model runs/stage2
    # whole photos rather than face crops: describe the square around the largest face
    python launch/serve.py --model runs/stage2/export --crop-face
    # from the command line
    curl -F image=@face.jpg http://127.0.0.1:8000/describe
    curl http://127.0.0.1:8000/health
    # GPU, reachable from other machines (there is no authentication: put it behind a proxy that has some)
    python launch/serve.py --model runs/stage2 --device cuda --host 0.0.0.0 --port 8080

POST /describe answers {"caption", "aus": [{"au", "name"}], "emotions", "face", "crop", "image"}; errors are
{"error": "..."} with 400 (no file), 413 (too large), 415 (not an image), 422 (corrupt). A missing or invalid
model directory prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, or a run directory holding export/")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--crop-face", action="store_true",
                        help="describe the square around the largest detected face (centre square if none)")
    parser.add_argument("--max-upload-mb", type=float, default=5.0, help="largest accepted upload in MiB")
    parser.add_argument("--beams", type=int, default=5, help="beam width for beam search (default: 5, as the paper)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="weights and compute dtype (bf16 halves memory; the Q-Former stays fp32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from expblip.infer.captioner import Captioner, resolve_export
    from expblip.model.blip2 import GenerationConfig
    from expblip.serve.app import MiB, create_app

    try:
        captioner = Captioner.from_export(resolve_export(args.model), device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    app = create_app(captioner, max_upload_bytes=int(args.max_upload_mb * MiB), crop_face=args.crop_face, gen=gen)
    print(f"expblip: serving {args.model} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
