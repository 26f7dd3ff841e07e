"""An outside harness through our API: lmms-eval's ``openai_compatible`` model against ``launch/serve.py`` on held-out
faces, scored by our own caption parser, beside ``launch/evaluate.py`` on the same faces with the same decoding.

    python bench/harness.py --model /tmp/demo1/runs/tiny_stage2 --shards /tmp/demo1/shards/test --limit 96
    python bench/harness.py                 # the demo's export and test shards (demo/...), else trained/drawn here
    python bench/harness.py --concurrency 64 --limit 128    # 64 requests in flight instead of lmms-eval's default

Not a ratio benchmark (no ``ratio:`` line): it prints the two score sets, whether they are equal to 3 decimals, how
many captions agree face for face, and what the server answered under the harness's load (its statuses from
/metrics and its access log; the client's retries, timeouts and failed requests from lmms-eval's log).

1. lmms-eval 0.7.3 lives in its own venv, outside the repo, made once and reused (``--venv``, default
   ``~/.cache/expblip/lmms-venv``): the CPU torch wheel of /opt/wheels first, then lmms-eval with a constraint that
   keeps that torch and filelock 3 (0.7.3 imports ``filelock._api``, gone in filelock 4), then torchvision removed
   (pip picks PyPI's CUDA build of torchvision, whose C ops fail to load beside a CPU torch, and transformers then
   cannot import its pipelines; the ``openai_compatible`` model needs none).
2. The faces: the seeded random ``--limit`` of ``--shards`` that ``launch/evaluate.py --limit`` draws
   (``expblip.eval.evaluate.subset_positions``), written as their own image files and a JSON-lines dataset on disk.
3. The task, in a temporary directory given to lmms-eval with ``--include_path``: a YAML (the JSON dataset,
   ``generate_until``, ``max_new_tokens``, temperature 0) and utils.py, whose ``doc_to_visual`` opens the face,
   ``doc_to_text`` is the export's prompt for ``--task`` (empty for Exp-BLIP's captions, as the server and
   evaluate.py use it), ``process_results`` parses each answer with ``expblip.infer.parse.parse_caption``, and the
   aggregations score all answers with ``expblip.eval.evaluate.evaluate_captions`` (mean AU F1, strict emotion
   accuracy), the functions evaluate.py scores with.
4. ``launch/serve.py`` (``--beams``, ``--max-new-tokens``; everything else at its defaults) on a free port;
   ``python -m lmms_eval eval --model openai_compatible`` at its default concurrency (``num_concurrent`` 32 in 0.7.3)
   unless ``--concurrency`` sets it; then ``launch/evaluate.py --limit`` on the same shards with the same
   ``--beams``, ``--max-new-tokens`` and ``--task``. Temperature 0 leaves the server's decoding (``--beams``) in force:
   ``--beams 1`` (the default here) is greedy on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

log = logging.getLogger("expblip.bench.harness")

LMMS_EVAL = "lmms-eval==0.7.3"
DEFAULT_VENV = Path.home() / ".cache" / "expblip" / "lmms-venv"
DEMO_SHARDS = REPO / "demo" / "shards" / "test"
TASK = "expblip_faces"
MODEL_NAME = "expblip-harness"
CHAT_ROUTE = "/v1/chat/completions"


# ---------------------------------------------------------------- lmms-eval's venv


def _pip(python: Path, *args: str, constraint: Path | None = None) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    subprocess.run(cmd + (["-c", str(constraint)] if constraint else []), check=True)


def lmms_python(venv: Path) -> Path:
    """The Python of a venv holding lmms-eval beside the CPU torch (made on first use, under a lock)."""
    python, ready = venv / "bin" / "python", venv / ".expblip-ready"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.is_file():
            return python
        wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
        if not wheels:
            raise SystemExit("error: no /opt/wheels/torch-2.13.0+cpu-*.whl to install lmms-eval beside; install "
                             f"torch==2.13.0 (CPU) into {venv} by hand and create {ready}")
        log.info("making %s: torch 2.13.0 CPU, then %s (a few minutes)", venv, LMMS_EVAL)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(python, str(wheels[-1]))
        constraint = venv / "constraints.txt"
        # pip may not swap in another (CUDA) torch; lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed
        constraint.write_text("torch==2.13.0+cpu\nfilelock<4\n")
        _pip(python, LMMS_EVAL, constraint=constraint)
        # PyPI's torchvision is built against CUDA torch: its ops fail to register beside the CPU torch
        # ("operator torchvision::nms does not exist"), which breaks `import transformers.pipelines` in lmms-eval
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision"], check=True)
        ready.write_text(LMMS_EVAL + "\n")
    return python


# ---------------------------------------------------------------- the faces and the task


def held_out_faces(shards: str, limit: int | None) -> list[dict]:
    """The faces ``launch/evaluate.py --limit`` scores, in its order: {key, ext, image bytes, labels}."""
    from expblip.data import stream
    from expblip.data.shards import resolve_shards
    from expblip.eval.evaluate import _label_fields, subset_positions

    total = stream.count_samples(shards)
    keep = None if limit is None or limit >= total else subset_positions(total, limit)
    urls, _ = resolve_shards(shards)
    errors, faces, position = stream.ErrorCounter.unlimited(), [], 0
    max_pixels = stream.StreamConfig(shards=shards).max_pixels
    for url in urls:
        for raw in stream.read_shard(url, errors):
            try:  # the stream's own checks: a sample it skips is not counted as a position either
                labels, _, _ = stream.decode_sample(raw, max_pixels)
            except Exception as bad:  # the stream's skip signal (bad JSON, no caption, bad image)
                log.warning("skipped %s: %s", raw.get("__key__"), bad)
                continue
            if keep is None or position in keep:
                ext = next(e for e in stream.IMAGE_EXTS if e in raw)
                faces.append({"key": raw["__key__"], "ext": ext, "bytes": raw[ext], **_label_fields(labels)})
            position += 1
    return faces


def write_dataset(faces: list[dict], root: Path) -> Path:
    """Each face as its own image file and one JSON line {key, image, aus, emotions, no_emotion}."""
    images = root / "faces"
    images.mkdir(parents=True)
    path = root / "faces.jsonl"
    with path.open("w") as out:
        for face in faces:
            image = images / f"{face['key']}.{face['ext']}"
            image.write_bytes(face["bytes"])
            row = {"key": face["key"], "image": str(image), "aus": face["aus"], "emotions": face["emotions"],
                   "no_emotion": bool(face.get("no_emotion"))}
            out.write(json.dumps(row) + "\n")
    return path


TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: key
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: mean_au_f1
    aggregation: !function utils.mean_au_f1
    higher_is_better: true
  - metric: emotion_accuracy
    aggregation: !function utils.emotion_accuracy
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS = '''\
"""lmms-eval hooks for expblip's held-out faces (written by bench/harness.py): scored by expblip's own parser."""
import json
import sys
from pathlib import Path

META = json.loads(Path(__file__).with_name("expblip_task.json").read_text())
sys.path.insert(0, META["repo"])

from PIL import Image  # noqa: E402

from expblip.eval.evaluate import evaluate_captions  # noqa: E402
from expblip.infer.parse import parse_caption  # noqa: E402


def doc_to_visual(doc):
    return [Image.open(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return META["prompt"]  # the export's prompt for the task: what the server and evaluate.py give the model


def process_results(doc, results):
    caption = results[0]
    item = {"key": doc["key"], "caption": caption, "aus": doc["aus"], "emotions": doc["emotions"],
            "no_emotion": doc["no_emotion"], "parsed": parse_caption(caption)}
    return {"mean_au_f1": item, "emotion_accuracy": item}


def _scores(items):
    labels = [{"aus": i["aus"], "emotions": i["emotions"], **({"no_emotion": True} if i["no_emotion"] else {})}
              for i in items]
    return evaluate_captions([i["caption"] for i in items], labels, META["aus"])


def mean_au_f1(items):
    score = _scores(items)["mean_au_f1"]
    return float("nan") if score is None else score


def emotion_accuracy(items):
    score = _scores(items)["emotion_accuracy"]
    return float("nan") if score is None else score
'''


def write_task(root: Path, data: Path, prompt: str, aus: list[int], max_new_tokens: int) -> Path:
    """The task directory given to lmms-eval with --include_path."""
    task = root / "task"
    task.mkdir()
    (task / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, max_new_tokens=max_new_tokens))
    (task / "utils.py").write_text(TASK_UTILS)
    (task / "expblip_task.json").write_text(json.dumps({"repo": str(REPO), "prompt": prompt, "aus": aus}))
    return task


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(export: Path, args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    """launch/serve.py at its defaults but ``--beams``/``--max-new-tokens``; yields its base URL, stops it after."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "launch" / "serve.py"), "--model", str(export), "--port", str(port),
           "--beams", str(args.beams), "--max-new-tokens", str(args.max_new_tokens), "--model-name", MODEL_NAME]
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "EXPBLIP_API_KEY": ""})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log_path)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"launch/serve.py exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"launch/serve.py did not answer /health within {timeout:g} s (log: {log_path})")


def server_metrics(url: str) -> dict:
    """From the server's /metrics: {"statuses" {status: requests} of POST /v1/chat/completions, "latency" {upper
    bound: cumulative requests} of that route, "batches" {upper bound: cumulative batches}}."""
    from expblip.serve.metrics import parse_histogram

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    latency = {}
    for bound, count in re.findall(rf'^expblip_request_seconds_bucket\{{le="([^"]+)",route="{CHAT_ROUTE}"\}} (\S+)$',
                                   text, flags=re.M):
        latency[float(bound)] = float(count)
    return {"statuses": _statuses(text), "latency": latency, "batches": parse_histogram(text, "expblip_batch_size")}


def _statuses(text: str) -> Counter:
    pattern = re.compile(r'^expblip_requests_total\{(.*)\} ([0-9.e+]+)$')
    counts: Counter = Counter()
    for line in text.splitlines():
        match = pattern.match(line)
        if match and f'route="{CHAT_ROUTE}"' in match.group(1):
            status = re.search(r'status="(\d+)"', match.group(1))
            counts[int(status.group(1))] += int(float(match.group(2)))
    return counts


def access_log_statuses(log_path: Path) -> Counter:
    """{status: requests} of POST /v1/chat/completions in uvicorn's access log."""
    pattern = re.compile(rf'"POST {re.escape(CHAT_ROUTE)} HTTP/[0-9.]+" (\d{{3}})')
    return Counter(int(m.group(1)) for m in pattern.finditer(log_path.read_text()))


# ---------------------------------------------------------------- the two evaluations


def run_lmms(python: Path, task: Path, url: str, out: Path, args: argparse.Namespace, log_path: Path) -> dict:
    """lmms-eval's openai_compatible model against the server; {"scores", "captions" {key: caption}, "seconds",
    "client" counts from its log}."""
    model_args = f"model={MODEL_NAME},base_url={url}/v1,api_key=harness"
    if args.concurrency:
        model_args += f",num_concurrent={args.concurrency}"
    cmd = [str(python), "-m", "lmms_eval", "eval", "--model", "openai_compatible", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(task), "--output_path", str(out), "--log_samples",
           "--verbosity", "INFO"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(out / "hf-datasets"), "OPENAI_LOG": "info", "TOKENIZERS_PARALLELISM": "false"}
    log.info("lmms-eval: %s", " ".join(cmd))
    start = time.perf_counter()
    with log_path.open("w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    found = list(out.rglob("*results.json"))
    if proc.returncode != 0 or not found:  # 0.7.3 logs "Error during evaluation" and exits 0: look for results
        raise RuntimeError(f"lmms-eval exited with {proc.returncode}, results: {len(found)} file(s) "
                           f"(log {log_path}):\n{log_path.read_text()[-3000:]}")
    results = json.loads(found[0].read_text())["results"][TASK]
    scores = {m: results.get(f"{m},none") for m in ("mean_au_f1", "emotion_accuracy")}
    captions = {}
    for line in next(out.rglob(f"*samples_{TASK}.jsonl")).read_text().splitlines():
        item = json.loads(line)["mean_au_f1"]
        captions[item["key"]] = item["caption"]
    return {"scores": scores, "captions": captions, "seconds": seconds, "client": client_counts(log_path)}


def client_counts(log_path: Path) -> dict:
    """What lmms-eval's side saw: the openai SDK's own retries (its INFO log, OPENAI_LOG=info), lmms-eval's retries
    of a request the SDK gave up on, timeout messages and requests that failed for good."""
    text = log_path.read_text()
    return {"sdk_retries": len(re.findall(r"Retrying request", text)),
            "lmms_retries": len(re.findall(r"Attempt \d+/\d+ failed", text)),
            "timeouts": len(re.findall(r"timed out|Timeout", text)),
            "failed": len(re.findall(r"LMMS_EVAL_REQUEST_FAILED", text)),
            # the sum of every request's latency, as lmms-eval's metric summary gives it
            "latency_sum": float((re.findall(r"Total elapsed time: ([0-9.]+)s", text) or ["nan"])[-1])}


def run_evaluate(export: Path, args: argparse.Namespace, out: Path) -> dict:
    """launch/evaluate.py on the same faces with the same decoding; {"scores", "captions", "seconds"}."""
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--model", str(export), "--shards", args.shards,
           "--beams", str(args.beams), "--max-new-tokens", str(args.max_new_tokens), "--task", args.task,
           "--no-caption-metrics", "--no-progress", "--out", str(out)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    log.info("evaluate.py: %s", " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stdout[-2000:] + proc.stderr[-2000:]
        raise RuntimeError(f"launch/evaluate.py exited with {proc.returncode}:\n{tail}")
    result = json.loads((out / "metrics.json").read_text())
    scores = {m: result["model"][m] for m in ("mean_au_f1", "emotion_accuracy")}
    items = result["items"]
    return {"scores": scores, "captions": dict(zip(items["keys"], items["captions"], strict=True)), "seconds": seconds}


# ---------------------------------------------------------------- inputs, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained export (RUN_DIR or RUN_DIR/export); default: the demo's, else one "
                                        "trained here first (bench/generate.py's)")
    parser.add_argument("--shards", default="", help="held-out shards (default: the demo's test shards, else 300 "
                                                     "synthetic test faces drawn here)")
    parser.add_argument("--limit", type=int, default=96, help="a seeded random N of the held-out faces, as "
                                                              "evaluate.py --limit draws them (0: all)")
    parser.add_argument("--task", default="describe", help="the export's task whose prompt both sides ask")
    parser.add_argument("--beams", type=int, default=1, help="the server's and evaluate.py's beam width (1: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="both sides' caption length limit "
                                                                       "(evaluate.py's default)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="lmms-eval's num_concurrent (default: not passed, lmms-eval's own default, 32)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="lmms-eval's venv (made on first use)")
    parser.add_argument("--keep", type=Path, help="keep the task, dataset, logs and outputs in this directory")
    args = parser.parse_args(argv)
    if min(args.beams, args.max_new_tokens) < 1 or args.limit < 0 or args.concurrency < 0:
        parser.error("--beams and --max-new-tokens must be >= 1; --limit and --concurrency >= 0")
    args.limit = args.limit or None
    return args


def default_shards(root: Path) -> str:
    """The demo's test shards, else 300 synthetic test faces written under ``root``."""
    if (DEMO_SHARDS / "manifest.json").is_file():
        return str(DEMO_SHARDS)
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    write_shards(synthetic_records(300, seed=0, split="test"), str(root / "test"), samples_per_shard=500,
                 progress=False)
    return str(root / "test")


def export_prompt(export: Path, task: str) -> str:
    tasks = json.loads((export / "expblip.json").read_text()).get("tasks") or {"describe": ""}
    if task not in tasks:
        raise SystemExit(f"error: --task {task}: the export was trained on {sorted(tasks)}")
    return tasks[task]


def scored_aus(shards: str) -> list[int]:
    """The AU set evaluate.py scores: the held-out shards' dataset's (expblip.eval.provenance)."""
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.provenance import resolve_aus

    return list(DATASET_AUS[resolve_aus("", shards)[0]])


def report(lmms: dict, ours: dict, server: dict, faces: int, args: argparse.Namespace, export: Path) -> bool:
    """Print the figures; True when both score sets agree to 3 decimals."""
    names = ("mean_au_f1", "emotion_accuracy")
    print(f"faces: {faces} of {args.shards} (seeded as evaluate.py --limit {args.limit})   export: {export}   "
          f"decoding: {args.beams} beam(s), {args.max_new_tokens} new tokens max, temperature 0")
    for name, side in (("lmms-eval openai_compatible -> serve.py", lmms), ("launch/evaluate.py", ours)):
        scores = "   ".join(f"{m}: {side['scores'][m]:.4f}" for m in names)
        print(f"{name}: {scores}   ({side['seconds']:.1f} s)")
    equal = all(round(lmms["scores"][m], 3) == round(ours["scores"][m], 3) for m in names)
    same = sum(lmms["captions"].get(k) == c for k, c in ours["captions"].items())
    print(f"captions identical face for face: {same}/{len(ours['captions'])}")
    print("\n".join(load_lines(server, lmms["client"], faces, args.concurrency)))
    print(f"equal to 3 decimals: {'yes' if equal else 'no'}", flush=True)
    return equal


def load_lines(server: dict, client: dict, faces: int, concurrency: int) -> list[str]:
    """What the server answered under the harness's load, and what lmms-eval's side saw."""
    from serve_load import histogram_line  # bench/serve_load.py: batches per size bucket

    statuses, latency = server["statuses"], server["latency"]
    answered = max(latency.values(), default=0)
    slowest = min((b for b, n in latency.items() if n >= answered), default=float("nan"))
    p50 = min((b for b, n in latency.items() if n >= answered / 2), default=float("nan"))
    return [f"server ({CHAT_ROUTE}): statuses from /metrics {dict(sorted(statuses.items()))}, from its access log "
            f"{dict(sorted(server['access_log'].items()))}; 5xx: {sum(n for s, n in statuses.items() if s >= 500)}, "
            f"504 (timed out): {statuses.get(504, 0)}, 503 (queue full): {statuses.get(503, 0)}",
            f"latency under the harness: mean {client['latency_sum'] / max(1, faces):.1f} s (lmms-eval's sum / faces);"
            f" server histogram p50 <= {p50:g} s, all <= {slowest:g} s (504 after --timeout, 120 s); batch sizes: "
            f"{histogram_line({}, server['batches'])}",
            f"lmms-eval (num_concurrent {concurrency or 'default, 32'}): SDK retries {client['sdk_retries']}, "
            f"lmms-eval retries {client['lmms_retries']}, timeout lines {client['timeouts']}, failed requests "
            f"{client['failed']}"]


def run(args: argparse.Namespace, export: Path, root: Path) -> bool:
    python = lmms_python(args.venv)
    args.shards = args.shards or default_shards(root)
    faces = held_out_faces(args.shards, args.limit)
    task = write_task(root, write_dataset(faces, root), export_prompt(export, args.task), scored_aus(args.shards),
                      args.max_new_tokens)
    server_log = root / "server.log"
    with server(export, args, server_log) as url:
        lmms = run_lmms(python, task, url, root / "lmms-out", args, root / "lmms-eval.log")
        answered = server_metrics(url)
    answered["access_log"] = access_log_statuses(server_log)
    ours = run_evaluate(export, args, root / "evaluate")
    return report(lmms, ours, answered, len(faces), args, export)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from generate import bench_export  # bench/generate.py: --model, else the demo's export, else one trained

    try:
        with bench_export(args.model, 0) as export, work_dir(args.keep) as root:
            equal = run(args, Path(export), root)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        return exit_.code if isinstance(exit_.code, int) else 2
    return 0 if equal else 1


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """A new directory under ``keep`` that stays, or a temporary one."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="harness-", dir=keep))
        return
    with tempfile.TemporaryDirectory(prefix="expblip-harness-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    sys.exit(main())
