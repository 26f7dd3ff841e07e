"""The batching HTTP server against one-at-a-time serving under 16 concurrent clients: same export, same images.

    python bench/serve_load.py [--clients 16] [--requests 128] [--lone 12] [--beams 5] [--max-new-tokens 20] [--rounds 2]
    python bench/serve_load.py --model runs/tiny_stage2      # a trained export (RUN_DIR or RUN_DIR/export)

Without ``--model`` it uses the trained export bench/generate.py uses: the demo's ``demo/runs/tiny_stage2`` when
``make demo`` has made it, else one trained first (about 2 minutes), so that captions end with the end token.
Both sides are ``expblip.serve.app.create_app`` over one Captioner of that export under a real uvicorn server on
127.0.0.1, with the same decoding settings:

"batching"       the server as launch/serve.py starts it: batches of up to ``--max-batch`` images gathered for at most
                 ``--max-wait-ms``.
"one-at-a-time"  ``max_batch=1, max_wait_ms=0``: each request gets its own ``generate`` call, one after another — what
                 the server did before batching (one request at a time behind a lock).

Each round, for each side (the order alternates between rounds): ``--clients`` threads POST ``--requests`` synthetic
64-px face PNGs to /describe, each client waiting for its answer before sending the next (closed loop), then one
client sends ``--lone`` requests alone. Printed per side: throughput (median over rounds), p50 and p99 latency under
load, the lone client's p50; then the batch sizes the batching server used under load (from its /metrics) and the
lone client's p50 ratio. The last line is ``ratio: <throughput batching / one-at-a-time>``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SIDES = ("batching", "one-at-a-time")


def post_image(url: str, data: bytes) -> tuple[int, float]:
    """POST one PNG to /describe (multipart); (status, seconds)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="face.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    parts = urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        conn.request("POST", "/describe", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    finally:
        conn.close()


def load(url: str, images: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """``clients`` closed-loop clients send ``requests`` images in all; (wall seconds, latencies). Raises on non-200."""
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, seconds = post_image(url, images[i % len(images)])
            with lock:
                (latencies if status == 200 else errors).append(seconds if status == 200 else status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed with status {sorted(set(errors))}")
    return wall, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def batch_counts(url: str) -> dict[float, float]:
    """{bucket upper bound: batches} (cumulative, from /metrics) of the server's batch-size histogram."""
    from expblip.serve.metrics import parse_histogram

    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return parse_histogram(text, "expblip_batch_size")


def histogram_line(before: dict[float, float], after: dict[float, float]) -> str:
    """Batches per size bucket between two scrapes: '1: 3  2: 1  3-4: 2 ...'."""
    bounds = sorted(after)
    parts, low, previous = [], 1, 0.0
    for bound in bounds:
        cumulative = after[bound] - before.get(bound, 0.0)
        count = cumulative - previous
        previous = cumulative
        label = "more" if bound == float("inf") else (f"{low}" if low == int(bound) else f"{low}-{int(bound)}")
        if count:
            parts.append(f"{label}: {int(count)}")
        low = int(bound) + 1 if bound != float("inf") else low
    return "  ".join(parts) or "none"


def run_side(app, images: list[bytes], args: argparse.Namespace, side: str) -> dict:
    from expblip.serve.app import background_server

    with background_server(app) as url:
        for data in images[:2]:
            post_image(url, data)  # warm-up
        before = batch_counts(url)
        wall, latencies = load(url, images, args.clients, args.requests)
        after = batch_counts(url)
        _, lone = load(url, images, 1, args.lone)
    return {"throughput": args.requests / wall, "latencies": latencies, "lone": lone,
            "batches": (before, after), "side": side}


def make_apps(export: Path, args: argparse.Namespace) -> dict:
    from expblip.infer.captioner import Captioner
    from expblip.model.generation import GenerationConfig
    from expblip.serve.app import create_app

    captioner = Captioner.from_export(export)  # one model copy, shared by both servers (never at the same time)
    gen = GenerationConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    return {"batching": lambda: create_app(captioner, gen=gen, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms),
            "one-at-a-time": lambda: create_app(captioner, gen=gen, max_batch=1, max_wait_ms=0)}


def measure(export: Path, images: list[bytes], args: argparse.Namespace) -> dict[str, list[dict]]:
    apps = make_apps(export, args)
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in (SIDES if round_ % 2 == 0 else SIDES[::-1]):
            results[side].append(run_side(apps[side](), images, args, side))
    return results


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    lines, rates, lone = [], {}, {}
    for side in SIDES:
        runs = results[side]
        rates[side] = statistics.median(r["throughput"] for r in runs)
        latencies = [x for r in runs for x in r["latencies"]]
        lone[side] = statistics.median(x for r in runs for x in r["lone"])
        lines.append(f"{side:>13}: {rates[side]:6.2f} req/s   under load p50 {1000 * percentile(latencies, 50):7.0f} ms"
                     f"   p99 {1000 * percentile(latencies, 99):7.0f} ms   lone client p50 {1000 * lone[side]:6.0f} ms")
    for i, run in enumerate(results["batching"]):
        lines.append(f"batch sizes under load (batching, round {i + 1}): {histogram_line(*run['batches'])}")
    lines.append(f"({args.clients} clients, {args.requests} requests per round, {args.rounds} rounds, {args.beams} beams, "
                 f"{args.max_new_tokens} new tokens, batches of up to {args.max_batch} / {args.max_wait_ms:g} ms)")
    lines.append(f"lone client p50, batching / one-at-a-time: {lone['batching'] / lone['one-at-a-time']:.2f}")
    lines.append(f"ratio: {rates['batching'] / rates['one-at-a-time']:.3f}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from expblip.serve.batching import DEFAULT_MAX_WAIT_MS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128, help="requests per side and round, all clients together")
    parser.add_argument("--lone", type=int, default=12, help="requests of the lone client per side and round")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="an export (RUN_DIR or RUN_DIR/export); default: the demo's trained one, "
                                        "else one trained here first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.lone, args.beams, args.max_new_tokens, args.max_batch, args.rounds) < 1:
        parser.error("--clients, --requests, --lone, --beams, --max-new-tokens, --max-batch and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from generate import bench_export

    from expblip.data.synthetic import synthetic_records

    images = []
    for record in synthetic_records(16, seed=7):
        buffer = io.BytesIO()
        record["image"].save(buffer, "PNG")
        images.append(buffer.getvalue())
    try:
        with bench_export(args.model, args.threads) as export:
            results = measure(export, images, args)
    except SystemExit as exit_:
        return int(exit_.code)
    print("\n".join(report(results, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
