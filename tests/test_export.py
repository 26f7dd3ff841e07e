"""Export of a real ZeRO-3 checkpoint (2 CPU ranks): stock transformers generates exactly what our Captioner does;
trainable-only exports round-trip onto their frozen towers and refuse others."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_cmd, launch_module, run_launcher

from expblip.model.weights import TowerMismatchError, load_trainable_export, merge_trainable, read_state

pytestmark = pytest.mark.slow

STEPS = 2




def _random_export(tokenizer, seed: int, out: Path) -> Path:
    from expblip.model.blip2 import ModelConfig, build_model
    from expblip.model.weights import export_hf

    torch.manual_seed(seed)
    model = build_model(ModelConfig(), tokenizer)
    return export_hf(model.state_dict(), model.config, tokenizer, out)


@pytest.fixture(scope="module")
def towers(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """Initial weights (the frozen towers the run trains on) and another random model with the same tokenizer."""
    from expblip.data.stream import StreamConfig, iterate_once
    from expblip.model.tokenizer import train_caption_tokenizer

    captions = [c for b in iterate_once(StreamConfig(shards=str(tiny_shards["train"]))) for c in b["captions"]]
    tokenizer = train_caption_tokenizer(captions, vocab_size=256)
    root = tmp_path_factory.mktemp("towers")
    return {"init": _random_export(tokenizer, 0, root / "init"), "other": _random_export(tokenizer, 1, root / "other")}


@pytest.fixture(scope="module")
def run_dir(tiny_shards, towers, tmp_path_factory) -> Path:
    """A real ZeRO-3 run: 2 CPU ranks, 2 optimiser steps, a checkpoint at step 2 (and the trainer's own export)."""
    run = tmp_path_factory.mktemp("run")
    proc = run_launcher(deepspeed_cmd(
        "--deepspeed", "ds_configs/zero3.json", f"data.train.shards={tiny_shards['train']}", "data.train.batch_size=4",
        f"model.weights={towers['init']}", "model.dropout=0.0", "optim.lr=1e-3", "optim.warmup_steps=0",
        f"train.max_steps={STEPS}", f"train.ckpt_every={STEPS}", "train.log_every=1", f"train.run_dir={run}",
        "tracking.enabled=false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / f"step{STEPS:08d}").is_dir()
    return run


@pytest.fixture(scope="module")
def full(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "full"
    assert launch_module("export").main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small(run_dir, tmp_path_factory) -> Path:
    from expblip.train.export import export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "small"
    result = export_checkpoint(run_dir / "checkpoints" / f"step{STEPS:08d}", out, trainable_only=True)
    assert result.step == STEPS and result.trainable_only
    return out


def test_export_is_the_trained_model(full, run_dir, towers):
    ours, trainers = read_state(full), read_state(run_dir / "export")  # the loop's own export, gathered in-process
    assert sorted(ours) == sorted(trainers) and all(torch.equal(ours[k], trainers[k]) for k in ours)
    init = read_state(towers["init"])
    frozen = [k for k in init if k.startswith(("vision_model.", "language_model."))]
    trained = [k for k in init if k.startswith(("qformer.", "query_tokens", "language_projection."))]
    assert all(torch.equal(init[k], ours[k]) for k in frozen)
    assert sum(not torch.equal(init[k], ours[k]) for k in trained) > 0.9 * len(trained)
    meta = json.loads((full / "expblip.json").read_text())
    assert meta["format"] == "full" and meta["source"]["step"] == STEPS and meta["image_size"] == 64
    assert (full / "config.yaml").read_text() == (run_dir / "checkpoints" / f"step{STEPS:08d}" / "config.yaml").read_text()


def test_checkpoint_dir_exports_the_same_weights(full, run_dir, tmp_path):
    from expblip.train.export import export_checkpoint

    export_checkpoint(run_dir / "checkpoints" / f"step{STEPS:08d}", tmp_path / "again", dtype="bfloat16")
    a, b = read_state(full), read_state(tmp_path / "again")
    assert all(b[k].dtype == (torch.float32 if k.startswith(("qformer.", "query_tokens")) else torch.bfloat16)
               for k in b)
    assert all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in b)


STOCK = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoTokenizer, Blip2ForConditionalGeneration
export, image = sys.argv[1], sys.argv[2]
meta = json.load(open(f"{export}/expblip.json"))
model = Blip2ForConditionalGeneration.from_pretrained(export, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
size = meta["image_size"]
x = np.asarray(Image.open(image).convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
with torch.no_grad():
    out = model.generate(pixel_values=pixels, do_sample=False, num_beams=1, max_new_tokens=12, min_new_tokens=3,
                         eos_token_id=meta["caption_end_id"], pad_token_id=tok.pad_token_id)
new = out[0, meta["num_query_tokens"] + 1:].tolist()
print(json.dumps({"ids": new, "caption": tok.decode(new, skip_special_tokens=True).strip(),
                  "expblip_imported": any(m.startswith("expblip") for m in sys.modules)}))
"""


def test_stock_transformers_generates_what_our_captioner_generates(full, tmp_path):
    from expblip.data.synthetic import synthetic_records
    from expblip.infer.captioner import Captioner
    from expblip.model.blip2 import GenerationConfig

    image = next(synthetic_records(1, seed=5, split="test"))["image"]
    image.save(tmp_path / "face.png")
    proc = subprocess.run([sys.executable, "-c", STOCK, str(full), str(tmp_path / "face.png")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stock["expblip_imported"] is False and len(stock["ids"]) >= 3

    captioner = Captioner.from_export(full)
    greedy = GenerationConfig(num_beams=1, max_new_tokens=12, min_new_tokens=3)
    from PIL import Image

    reloaded = Image.open(tmp_path / "face.png")
    assert captioner.caption([reloaded], greedy) == [stock["caption"]]
    pixels = captioner.preprocess([reloaded])
    with torch.no_grad():
        ids = captioner.model.generate(pixel_values=pixels, do_sample=False, num_beams=1, max_new_tokens=12,
                                       min_new_tokens=3, eos_token_id=captioner.model.config.text_config.eos_token_id,
                                       pad_token_id=captioner.tokenizer.pad_token_id)
    assert ids[0, captioner.model.config.num_query_tokens + 1:].tolist() == stock["ids"]


def test_trainable_only_export_round_trips_onto_its_towers(small, full, towers):
    meta = json.loads((small / "expblip.json").read_text())
    assert meta["format"] == "trainable-only"
    kept = read_state(small)
    assert kept and all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in kept)
    assert set(meta["frozen"]) == {k for k in read_state(full) if k.startswith(("vision_model.", "language_model."))}
    assert sum(f.stat().st_size for f in small.glob("*.safetensors")) < 0.5 * (full / "model.safetensors").stat().st_size
    merged, want = merge_trainable(small, towers["init"]), read_state(full)
    merged = {k: v if torch.is_tensor(v) else v.contiguous() for k, v in merged.items()}  # towers stream lazily
    assert sorted(merged) == sorted(want) and all(torch.equal(merged[k], want[k]) for k in want)
    model, _, _ = load_trainable_export(small, towers["init"])
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_trainable_only_export_refuses_other_towers(small, towers, tmp_path, capsys):
    with pytest.raises(TowerMismatchError, match="trained on other frozen towers"):
        merge_trainable(small, towers["other"])
    main = launch_module("export").main
    assert main(["--merge", str(small), "--towers", str(towers["other"]), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"tensors differ \(language_model \d+, vision_model \d+\)", err), err
    assert not (tmp_path / "bad" / "config.json").exists()
    assert main(["--merge", str(small), "--towers", str(towers["init"]), "--out", str(tmp_path / "good")]) == 0
    from expblip.infer.captioner import Captioner

    with pytest.raises(ValueError, match="trainable-only export"):
        Captioner.from_export(small)  # no frozen towers in it: refused with the merge command
    Captioner.from_export(tmp_path / "good")


def test_bad_checkpoint_paths_are_named(run_dir, full, tmp_path, capsys):
    main = launch_module("export").main
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no complete DeepSpeed checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(run_dir), "--out", str(full)]) == 2
    assert "already holds an export" in capsys.readouterr().err
