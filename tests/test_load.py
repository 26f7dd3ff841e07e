"""Weights that scale: streamed safetensors (index-aware, local and s3), LAVIS files, the strict key check with
model.allow_missing, the streaming writer, and loads that keep a rank's memory bounded.

Run as a script by the deepspeed launcher (`--measure DIR`), it builds the `mid` preset partitioned over the ranks,
loads DIR into it and prints each rank's resident memory before and after (see test_streaming_load_...).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_cmd, read_metrics, run_launcher

from expblip.config import ConfigError
from expblip.model.blip2 import CaptionModel, ModelConfig, build_model
from expblip.model.tokenizer import train_caption_tokenizer
from expblip.model.weights import open_weights, read_state, save_hf_dir, write_safetensors
from expblip.train.load import allow_pattern, plan_load

GiB = 2**30


@pytest.fixture(scope="module")
def tokenizer():
    from expblip.data.synthetic import synthetic_records

    return train_caption_tokenizer([c for r in synthetic_records(40, seed=1) for c in r["captions"]], vocab_size=300)


@pytest.fixture(scope="module")
def tiny_hf(tokenizer, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny random BLIP-2 saved by transformers in many shards (+ index), and its state."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), tokenizer)
    out = tmp_path_factory.mktemp("tiny_hf") / "hf"
    model.save_pretrained(out, max_shard_size="100KB")
    tokenizer.save_pretrained(out)
    return out, model.state_dict()


# ---------------------------------------------------------------- reading


def test_sharded_source_reads_each_tensor_and_any_slice_of_it(tiny_hf):
    path, state = tiny_hf
    source = open_weights(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3 and source.kind == "hf"
    # the tied OPT head is not stored; everything else is, with its shape and dtype
    assert set(source.entries) == set(state) - {"language_model.lm_head.weight"}
    for key in source.entries:
        assert torch.equal(source.tensor(key), state[key]), key
    key = "language_model.model.decoder.embed_tokens.weight"
    flat = state[key].reshape(-1)
    got = torch.cat([chunk.clone() for _, chunk in source.read(key, 1000, 7001)])
    assert torch.equal(got, flat[1000:7001])


def test_chunks_are_bounded(tiny_hf, monkeypatch):
    import expblip.model.tensorio as tio

    monkeypatch.setattr(tio, "CHUNK_BYTES", 4096)
    path, state = tiny_hf
    key = "language_model.model.decoder.embed_tokens.weight"
    chunks = list(open_weights(path).read(key))
    assert len(chunks) == -(-state[key].numel() * 4 // 4096) and max(c.numel() for _, c in chunks) == 1024


def test_missing_shard_and_trainable_only_exports_are_refused(tiny_hf, tmp_path):
    import shutil

    path, _ = tiny_hf
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        open_weights(broken)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "expblip.json").write_text(json.dumps({"format": "trainable-only"}))
    with pytest.raises(ValueError, match="trainable-only export"):
        open_weights(tmp_path / "small")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_weights(tmp_path / "nothing")


def test_lavis_file_streams_under_transformers_names(tiny_hf, tmp_path):
    from test_weights import to_lavis

    _, state = tiny_hf
    with torch.no_grad():  # EVA's attention has q and v biases, no k bias
        state = {k: v.clone() for k, v in state.items()}
        for k in state:
            if k.endswith("self_attn.qkv.bias"):
                state[k][state[k].numel() // 3 : 2 * state[k].numel() // 3] = 0
    torch.save({"model": to_lavis(state), "epoch": 2}, tmp_path / "blip2.pth")
    source = open_weights(tmp_path / "blip2.pth")
    assert source.kind == "lavis" and set(source.entries) == set(state)
    assert all(torch.equal(source.tensor(k), state[k]) for k in state)


# ---------------------------------------------------------------- the key check


def test_allow_missing_globs_stay_within_dotted_parts():
    pattern = allow_pattern(["qformer.encoder.layer.*.output.**", "itm_head.**", "temp"])
    assert pattern.fullmatch("qformer.encoder.layer.11.output.dense.weight")
    assert not pattern.fullmatch("qformer.encoder.layer.11.attention.output.dense.weight")
    assert pattern.fullmatch("itm_head.bias") and pattern.fullmatch("temp") and not pattern.fullmatch("temperature")
    assert allow_pattern([]) is None


def test_key_report_names_missing_unexpected_and_misshapen_tensors(tiny_hf, tokenizer):
    path, _ = tiny_hf
    unit = CaptionModel(build_model(ModelConfig(), tokenizer))
    shapes = open_weights(path).shapes()
    assert plan_load(unit, shapes).problems() == ""
    shapes.pop("query_tokens")
    shapes["language_projection.bias"] = (7,)
    shapes["surprise.weight"] = (2, 2)
    shapes["itm_head.weight"] = (2, 64)  # a stage-1 head: reported as an extra, never an error
    report = plan_load(unit, shapes)
    problems = report.problems()
    assert "missing 1: query_tokens" in problems and "unexpected 1: surprise.weight" in problems
    assert "language_projection.bias is [7] in the weights, [64] in the model" in problems
    assert report.extras == ["itm_head.weight"]
    allowed = plan_load(unit, {k: v for k, v in shapes.items() if k not in ("surprise.weight",
                                                                            "language_projection.bias")},
                        ["query_tokens", "language_projection.**"])
    assert allowed.problems() == "" and sorted(n for s in allowed.allowed for n in s.names) == [
        "language_projection.bias", "query_tokens"]


def test_stage1_heads_load_from_their_lavis_names(tokenizer):
    from expblip.model.stage1 import Stage1Config, build_stage1, train_qformer_tokenizer

    qtok = train_qformer_tokenizer(["the face shows happiness"] * 4, 64)
    unit = build_stage1(ModelConfig(), Stage1Config(), tokenizer, qtok)
    shapes = {k.removeprefix("blip2."): tuple(v.shape) for k, v in unit.state_dict().items()}
    renamed = {unit.source_key(k): v for k, v in shapes.items()}
    assert "lavis.temp" in renamed and "vision_projection.weight" in renamed
    assert "lavis.Qformer.cls.predictions.transform.dense.weight" in renamed
    renamed["lavis.temp"] = ()  # LAVIS keeps the temperature as a 0-d tensor
    assert plan_load(unit, renamed).problems() == ""


def test_stage1_from_stage2_weights_starts_its_new_parts_as_transformers_initialises_them(tiny_hf, tokenizer):
    """The tiny recipe's allow_missing: stage-1 heads and the Q-Former's text feed-forward start new (LayerNorms at
    1, not the uninitialised memory of a model built without initialisation); the rest comes from the weights."""
    from expblip.config import load_config
    from expblip.model.stage1 import Stage1Config, build_stage1, train_qformer_tokenizer
    from expblip.train.load import load_initial_weights

    path, state = tiny_hf
    qtok = train_qformer_tokenizer(["the face shows happiness"] * 4, 64)
    allow = load_config(Path(__file__).resolve().parents[1] / "recipes" / "tiny_stage1.yaml").model.allow_missing
    source = open_weights(path)
    with pytest.raises(ConfigError, match=r"missing \d+: .*qformer\.encoder\.layer\.0\.intermediate"):
        load_initial_weights(build_stage1(ModelConfig(), Stage1Config(), tokenizer, qtok, init=False), source, (), 0)
    unit = build_stage1(ModelConfig(), Stage1Config(), tokenizer, qtok, init=False)
    with torch.no_grad():
        unit.blip2.qformer.encoder.layer[0].output.LayerNorm.weight.fill_(7.0)  # what no initialisation may leave
    report = load_initial_weights(unit, source, allow, 0)
    new = sorted(n for s in report.allowed for n in s.names)
    assert "qformer.encoder.layer.0.output.LayerNorm.weight" in new and "itm_head.weight" in new
    assert torch.all(unit.blip2.qformer.encoder.layer[0].output.LayerNorm.weight == 1.0)
    got = {k.removeprefix("blip2."): v for k, v in unit.state_dict().items()}
    assert all(torch.equal(got[k], state[k]) for k in state)


# ---------------------------------------------------------------- writing


def test_streaming_writer_round_trips_through_stock_readers(tiny_hf, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    path, state = tiny_hf
    source = open_weights(path)
    lazy = {k: source.lazy(k) for k in source.entries}  # nothing is read until each tensor is written
    files = write_safetensors(lazy, tmp_path, torch.bfloat16, max_shard_bytes=50_000, name="w")
    back = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
    assert back.keys() == lazy.keys() and len(files) > 3
    for k, v in back.items():
        assert v.dtype == (torch.float32 if k.startswith(("qformer.", "query_tokens")) else torch.bfloat16), k
        assert torch.equal(v, state[k].to(v.dtype)), k
    config = Blip2ForConditionalGeneration.from_pretrained(str(path)).config
    out = save_hf_dir(lazy, config, tokenizer, tmp_path / "export", max_shard_bytes=200_000)
    loaded = Blip2ForConditionalGeneration.from_pretrained(str(out))
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


# ---------------------------------------------------------------- a rank's memory while loading


MEASURE_PRESET = "mid"  # 0.27 B parameters: a 0.5 GiB bf16 checkpoint, 0.25 GiB per rank on 2 ranks


@pytest.fixture(scope="module")
def mid_weights(tmp_path_factory) -> Path:
    """A random `mid` BLIP-2 (bf16, 0.5 GiB) saved by transformers in 100 MB shards, beside its tokenizer."""
    out = tmp_path_factory.mktemp("mid") / "weights"
    proc = run_launcher([sys.executable, "bench/paper_scale.py", "--preset", MEASURE_PRESET, "--write-weights",
                         str(out), "--max-shard-size", "100MB"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    return out


def _measure(weights: str) -> None:
    """Script mode: build `mid` partitioned over the ranks, load `weights` into it, print memory (bytes)."""
    from expblip.config import load_config
    from expblip.model.tokenizer import load_tokenizer
    from expblip.model.weights import open_weights as open_source
    from expblip.train import comm, engine
    from expblip.train.load import load_initial_weights
    from expblip.train.loop import build_unit

    rank, world = comm.init_distributed()
    cfg = load_config(None, [f"model.preset={MEASURE_PRESET}", f"model.weights={weights}", "model.frozen_dtype=bfloat16",
                             "train.ds_config=ds_configs/zero3_bf16.json", "data.train.shards=unused"])
    ds = engine.resolve_ds_config(cfg, world)
    unit = build_unit(cfg, ds, load_tokenizer(weights), None, init=False)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
    before = _status("VmHWM")
    load_initial_weights(unit, open_source(weights), (), rank)
    held = engine.resident_parameter_bytes(unit)[0]
    print(json.dumps({"rank": rank, "before": before, "peak": _status("VmHWM"), "held": held}), flush=True)
    comm.close_distributed()  # left to interpreter exit, gloo's threads may abort the rank (comm.close_distributed)


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_streaming_load_keeps_each_ranks_peak_memory_to_its_partitions(mid_weights):
    """Each of 2 ranks holds its own half of the checkpoint (its partitions, allocated when the model was built) and
    grows while loading by a bounded buffer only: never by the whole state (as a rank reading all of it would), nor
    by the mapped pages it has read (released chunk by chunk)."""
    size = sum(f.stat().st_size for f in mid_weights.glob("*.safetensors"))
    cmd = deepspeed_cmd(f"--measure={mid_weights}", ranks=2)
    cmd[cmd.index("launch/finetune.py")] = "tests/test_load.py"
    start = time.perf_counter()
    proc = run_launcher(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each rank prints one JSON object; the two ranks' lines may run together in the launcher's stdout
    ranks = [json.loads(obj) for obj in re.findall(r'\{"rank": [^{}]*\}', proc.stdout)]
    assert sorted(r["rank"] for r in ranks) == [0, 1], proc.stdout[-2000:]
    for r in ranks:
        grown = r["peak"] - r["before"]
        print(f"rank {r['rank']}: grew {grown / GiB:.3f} GiB loading, holds {r['held'] / GiB:.3f} GiB of a "
              f"{size / GiB:.3f} GiB checkpoint ({time.perf_counter() - start:.0f} s)")
        assert r["held"] == pytest.approx(size / 2, rel=0.02)  # its partitions: half of every tensor
        assert grown < 0.15 * GiB < 0.5 * size  # a 64 MiB chunk and allocator slack; not the state, nor its half


# ---------------------------------------------------------------- strictness across ranks


@pytest.fixture(scope="module")
def broken_weights(tiny_hf, tmp_path_factory) -> Path:
    """The tiny checkpoint without query_tokens and with a misshapen projection bias."""
    path, state = tiny_hf
    out = tmp_path_factory.mktemp("broken") / "weights"
    out.mkdir()
    bad = {k: v for k, v in state.items() if k not in ("query_tokens", "language_model.lm_head.weight")}
    bad["language_projection.bias"] = torch.zeros(3)
    write_safetensors(bad, out)
    for f in path.glob("*.json"):
        if "safetensors" not in f.name:
            (out / f.name).write_text(f.read_text())
    return out


@pytest.mark.slow
def test_a_missing_or_misshapen_key_fails_on_every_rank_naming_it(broken_weights, tiny_shards, tmp_path):
    start = time.perf_counter()
    proc = run_launcher(deepspeed_cmd(f"model.weights={broken_weights}", f"data.train.shards={tiny_shards['train']}",
                                      "tracking.enabled=false", f"train.run_dir={tmp_path / 'run'}", ranks=2),
                        timeout=180)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and seconds < 180
    # each rank prints its own line (two processes share stderr, so the lines may run into each other)
    ranks = re.findall(r"error: rank (\d): model\.weights \S+ does not fit the model \(missing 1: query_tokens; "
                       r"wrong shape 1: language_projection\.bias is \[3\] in the weights", proc.stderr)
    assert sorted(ranks) == ["0", "1"], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- other sources start a training run


def _train(weights: str, tiny_shards, run_dir: Path, env: dict | None = None, ranks: int = 1,
           extra: list[str] = ()):
    proc = run_launcher(deepspeed_cmd(f"model.weights={weights}", f"data.train.shards={tiny_shards['train']}",
                                      "data.train.batch_size=8", "train.max_steps=2", "train.log_every=1",
                                      "tracking.enabled=false", f"train.run_dir={run_dir}", *extra, ranks=ranks),
                        env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_lavis_state_dict_starts_a_training_run(tiny_hf, tiny_shards, tmp_path):
    from test_weights import to_lavis

    path, state = tiny_hf
    state = {k: v.clone() for k, v in state.items()}
    for k in state:
        if k.endswith("self_attn.qkv.bias"):
            state[k][state[k].numel() // 3 : 2 * state[k].numel() // 3] = 0
    pth = tmp_path / "blip2_exp.pth"
    torch.save({"model": to_lavis(state), "epoch": 3}, pth)  # as LAVIS' runner saves, EVA's q/v biases apart
    proc = _train(str(pth), tiny_shards, tmp_path / "run", ranks=1, extra=[f"model.tokenizer={path}"])
    assert f"weights {pth} (lavis): 123 tensors streamed" in proc.stdout
    assert len(read_metrics(tmp_path / "run")) == 2
    exported = read_state(tmp_path / "run" / "export")
    assert all(torch.equal(exported[k], state[k]) for k in exported if k.startswith(("vision_model.", "language_model.")))


@pytest.mark.slow
def test_an_s3_directory_starts_a_training_run(tiny_hf, tiny_shards, s3_server, tmp_path):
    path, state = tiny_hf
    client = s3_server.client()
    client.create_bucket(Bucket="weights")
    for f in path.iterdir():
        client.upload_file(str(f), "weights", f"tiny/{f.name}")
    proc = _train("s3://weights/tiny", tiny_shards, tmp_path / "run", env=s3_server.env(), ranks=2)
    assert "weights s3://weights/tiny (hf): 123 tensors streamed" in proc.stdout
    assert len(read_metrics(tmp_path / "run")) == 2
    exported = read_state(tmp_path / "run" / "export")  # the towers are the ones on S3, the tokenizer came along
    assert all(torch.equal(exported[k], state[k]) for k in exported if k.startswith(("vision_model.", "language_model.")))


if __name__ == "__main__":
    if len(sys.argv) > 1 and any(a.startswith("--measure=") for a in sys.argv):
        _measure(next(a for a in sys.argv if a.startswith("--measure=")).split("=", 1)[1])
