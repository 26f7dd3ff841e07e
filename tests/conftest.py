"""Shared fixtures: the environment of STACK.md, tiny synthetic shards, and helpers to run the launchers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use stores under tmp_path


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Every test starts without $MLFLOW_TRACKING_URI; one that leaks it (as mlflow.set_tracking_uri does) fails."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    leaked = os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert leaked is None, f"the test left MLFLOW_TRACKING_URI={leaked} in the environment"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, Path]:
    """256 training faces (4 shards of 64) and 64 held-out faces, written once per session."""
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    root = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_records(256, seed=0), str(root / "train"), samples_per_shard=64, progress=False)
    write_shards(synthetic_records(64, seed=0, split="test"), str(root / "test"), samples_per_shard=32,
                 progress=False)
    return {"train": root / "train", "test": root / "test"}


def launch_module(name: str):
    """Import launch/NAME.py (a script, not a package module) to call its main(argv) in this process."""
    return _import_file(f"launch_{name}", REPO / "launch" / f"{name}.py")


def bench_module(name: str):
    """Import bench/NAME.py."""
    return _import_file(f"bench_{name}", REPO / "bench" / f"{name}.py")


def _import_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_export(out: Path, captions: list[str] | None = None, seed: int = 0, vocab_size: int = 300) -> Path:
    """A tiny random BLIP-2 export at ``out`` with a byte-level BPE trained on ``captions`` (default: the captions of
    40 synthetic faces). A random model never emits its end token: generate with a short max_new_tokens."""
    import torch

    from expblip.data.synthetic import synthetic_records
    from expblip.model.blip2 import ModelConfig, build_model
    from expblip.model.tokenizer import train_caption_tokenizer
    from expblip.model.weights import export_hf

    captions = captions or [c for r in synthetic_records(40, seed=1) for c in r["captions"]]
    tokenizer = train_caption_tokenizer(captions, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), tokenizer)
    return export_hf(model.state_dict(), model.config, tokenizer, out)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A run directory holding export/ (make_tiny_export), shared by the session: read it, never write into it."""
    run = tmp_path_factory.mktemp("tiny_run")
    make_tiny_export(run / "export")
    return run


@pytest.fixture(scope="session")
def tiny_qwen_run_dir(tmp_path_factory) -> Path:
    """A run directory holding a tiny random Qwen2.5-VL export whose tokenizer knows the synthetic captions (greedy,
    6 new tokens), shared by the session: read it, never write into it."""
    import torch

    from expblip.data.synthetic import synthetic_records
    from expblip.model import qwen_vl
    from expblip.model.generation import GenerationConfig

    captions = [c for r in synthetic_records(40, seed=3) for c in r["captions"]]
    tokenizer = qwen_vl.tiny_tokenizer(captions, vocab_size=300)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("tiny_qwen_run")
    qwen_vl.save_export(qwen_vl.build_model(tokenizer), qwen_vl.make_processor(tokenizer), run / "export",
                        gen=GenerationConfig(num_beams=1, max_new_tokens=6))
    return run


def ask_openai_api(captioner, image_png: bytes, gen):
    """The served captioner's answer to one PNG through its OpenAI chat API (the `openai` client, temperature 0)."""
    import base64

    import openai

    from expblip.serve.app import background_server, create_app

    with background_server(create_app(captioner, gen=gen)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        data = "data:image/png;base64," + base64.b64encode(image_png).decode()
        return client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}]}])


def tiny_image(path: Path, shade: int = 0, fmt: str = "JPEG") -> bytes:
    """A 4x4 image written to ``path`` (parents made); returns its bytes on disk. For dataset-layout trees."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (shade * 37 % 256, 90, 160)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_text(path: Path, text: str) -> Path:
    """``text`` written to ``path`` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_launcher(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the test environment; output captured as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


AUDIT_DIR = REPO / "tests" / "audit"


def audit_env(directory: Path) -> dict[str, str]:
    """The environment that installs the collective audit (tests/audit) in every process a launcher starts."""
    return {"EXPBLIP_AUDIT_COLLECTIVES": str(directory),
            "PYTHONPATH": os.pathsep.join(p for p in (str(AUDIT_DIR), os.environ.get("PYTHONPATH", "")) if p)}


def assert_collectives_suit_nccl(directory: Path, callers: set[str]) -> list[dict]:
    """The audited run's collectives of expblip's own code: every one fits a CUDA-only (NCCL) default group, and
    the audit saw calls from each module of `callers` (so it did watch them). Returns the records."""
    sys.path.insert(0, str(AUDIT_DIR))
    import collective_audit

    records = collective_audit.read(str(directory))
    seen = {r["caller"].split(":")[0] for r in records}
    assert callers <= seen, f"the audit saw no collective of {sorted(callers - seen)} (saw {sorted(seen)})"
    bad = [r for r in records if r["violation"]]
    assert not bad, f"{len(bad)} collectives a GPU node's NCCL group would refuse, e.g. {bad[:4]}"
    return records


def deepspeed_cmd(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(_free_port()), "launch/finetune.py", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    """Rank 0's metrics.jsonl of a run, one dict per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_keys(run_dir: Path) -> dict[int, list[tuple[str, int]]]:
    """train.log_keys of a run: step -> [(sample key, epoch)] over the ranks, in rank order, as trained. Where
    attempts overlap (a restart repeats the steps after its checkpoint), the latest attempt's step counts."""
    entries = [json.loads(line) for f in sorted((Path(run_dir) / "keys").glob("rank*.jsonl"))
               for line in f.read_text().splitlines()]
    latest = {}
    for e in entries:
        latest[e["step"]] = max(latest.get(e["step"], 0), e["attempt"])
    kept = sorted((e for e in entries if e["attempt"] == latest[e["step"]]), key=lambda e: (e["step"], e["rank"]))
    steps: dict[int, list[tuple[str, int]]] = {}
    for e in kept:
        steps.setdefault(e["step"], []).extend(zip(e["keys"], e["epochs"], strict=True))
    return steps


# ---------------------------------------------------------------- real services (tests/services.py)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the session (~3 s to start): .endpoint, .access_key, .secret, .env(), .client()."""
    from services import seaweedfs

    server = seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The URI (http://127.0.0.1:PORT) of an MLflow tracking server for the session (~5-15 s to start)."""
    from services import mlflow_server as start

    uri, stop = start(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop()
