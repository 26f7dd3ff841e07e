"""The Qwen2.5-VL family on the same stack as BLIP-2, through the deepspeed launcher and ZeRO-3:

- a LoRA run (adapters on the ViT, the LM trained whole) stopped on 2 ranks resumes on 1 and continues exactly: the
  adapters, the merger and the LM, their Adam moments and the schedule come back as saved, and the data goes on at
  the checkpoint's global position, every sample of the epoch seen once (expblip.data.order); held-out evaluation
  runs on validation shards; under Ray Train (launch/pretrain.py) the same run takes the same first steps;
- its export (adapters merged) is an HF directory stock transformers reads, and the captioner (launch/describe.py,
  the evaluator and the server stand on it) gives the caption stock transformers gives;
- a stage the family lacks and a trainable-only export are refused before training.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from conftest import REPO, ask_openai_api, deepspeed_cmd, read_keys, read_metrics, run_launcher
from PIL import Image

pytestmark = pytest.mark.slow
ZERO3 = "ds_configs/zero3.json"
MAX_STEPS, STOPPED_AT, EPOCH = 9, 7, 128  # two shards of 64: 8 steps of 2 ranks x 8 an epoch
RECIPE = REPO / "recipes" / "tiny_qwen_vl.yaml"


def _args(tiny_shards, val, run_dir) -> list[str]:
    return ["--config", str(RECIPE),
            f"data.train.shards={tiny_shards['train']}/shard-{{000000..000001}}.tar", "data.train.batch_size=8",
            "model.freeze_vision=true", "model.lora.towers=[vision]", "model.lora.r=4", "model.lora.alpha=16",
            "model.lora.dropout=0.0", "optim.lr=3e-3", "optim.warmup_steps=2", f"train.max_steps={MAX_STEPS}",
            "train.log_every=1", f"train.ckpt_every={STOPPED_AT}", "tracking.enabled=false", f"train.run_dir={run_dir}",
            "train.log_keys=true", f"data.eval.shards={val}", f"train.eval_every={MAX_STEPS}", "train.eval_generate=8"]


@pytest.fixture(scope="module")
def resumed(tiny_shards, tmp_path_factory):
    """(run dir, dump of the restored state, resumed launcher's stdout): 2 ranks to step 7, then 1 rank to step 9."""
    from test_world_size import _resume_cmd

    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    root = tmp_path_factory.mktemp("qwen_vl")
    write_shards(synthetic_records(16, seed=0, split="val"), str(root / "val"), samples_per_shard=16, progress=False,
                 meta={"source": "synthetic", "split": "val", "samples": 16, "seed": 0})
    run = root / "run"
    proc = run_launcher(deepspeed_cmd("--deepspeed", ZERO3, *_args(tiny_shards, root / "val", run),
                                      f"train.stop_after={STOPPED_AT}", ranks=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(run / "checkpoints", root / "stopped")
    proc = run_launcher(_resume_cmd(*_args(tiny_shards, root / "val", run), f"--dump={root / 'restored'}", ranks=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, run, proc.stdout


def test_lora_run_stopped_on_two_ranks_resumes_on_one_and_continues_exactly(resumed, tiny_shards):
    from expblip.config import load_config
    from expblip.train.optim import lr_at

    root, run, stdout = resumed
    assert f"start step {STOPPED_AT}" in stdout and "written by 2 ranks and this run has 1" in stdout
    saved = torch.load(root / "stopped" / f"step{STOPPED_AT:08d}" / "elastic.pt", weights_only=True)
    restored = torch.load(root / "restored" / "elastic.pt", weights_only=True)
    trained = set(saved["fp32"])  # the ViT's adapters, the merger and the LM train; the ViT's own weights do not
    vit = {k for k in trained if ".visual." in k and ".merger." not in k}
    assert vit and all(".lora_A." in k or ".lora_B." in k for k in vit)
    assert any(".merger." in k for k in trained) and any(".language_model." in k for k in trained)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == restored[key].keys(), key
        assert all(torch.equal(saved[key][k], restored[key][k]) for k in saved[key]), key
    assert any(v.abs().sum() > 0 for v in restored["exp_avg_sq"].values())  # moments of 7 steps, not zeros
    assert restored["optimizer_step"] == saved["optimizer_step"] == STOPPED_AT
    assert restored["lr_scheduler"]["last_epoch"] == saved["lr_scheduler"]["last_epoch"] == STOPPED_AT
    module = torch.load(root / "restored" / "module.pt", weights_only=True)  # what forward computes with
    assert all(torch.equal(module[k], v) for k, v in saved["fp32"].items())

    keys = read_keys(run)
    assert sorted(keys) == list(range(1, MAX_STEPS + 1))
    epoch0 = [k for s in sorted(keys) for k, e in keys[s] if e == 0]
    assert len(epoch0) == EPOCH and len(set(epoch0)) == EPOCH, "a sample of epoch 0 repeated or missing"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    optim = load_config(RECIPE, _args(tiny_shards, root / "val", run)[2:]).optim
    assert [m["lr"] for m in metrics if "lr" in m] == pytest.approx(
        [lr_at(s, optim, MAX_STEPS) for s in range(1, MAX_STEPS + 1)])


def test_the_same_lora_run_under_ray_train_takes_the_same_first_steps(resumed, tiny_shards, tmp_path):
    """Both launchers, one loop: launch/pretrain.py (Ray Train, 2 workers, ZeRO-3) on the fixture's config reads the
    same samples at each of its first 3 steps and gives the same losses as the deepspeed launcher's 2 ranks."""
    root, run, _ = resumed
    ray_run = tmp_path / "ray"
    proc = run_launcher([sys.executable, "launch/pretrain.py", *_args(tiny_shards, root / "val", ray_run),
                         "ray.num_workers=2", "train.stop_after=3"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    ray_keys, ds_keys = read_keys(ray_run), read_keys(run)
    assert sorted(ray_keys) == [1, 2, 3] and all(ray_keys[s] == ds_keys[s] for s in (1, 2, 3))
    ray_losses = [m["loss"] for m in read_metrics(ray_run) if "loss" in m]
    ds_losses = [m["loss"] for m in read_metrics(run) if "loss" in m][:3]
    assert len(ray_losses) == 3 and ray_losses == pytest.approx(ds_losses, rel=1e-4)


def test_export_is_a_qwen25_vl_selected_on_validation_with_adapters_merged(resumed):
    root, run, _ = resumed
    export = run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    meta = json.loads((export / "expblip.json").read_text())
    assert meta["image_size"] == 64 and meta["lora"]["r"] == 4
    assert meta["selection"]["split"] == "val" and meta["selection"]["best_step"] == MAX_STEPS
    assert not (run / "export-trainable").exists()  # the family writes full exports only
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert not any("lora_" in k or "base_layer" in k for k in f.keys())  # folded into plain weights


def test_the_captioner_and_stock_transformers_give_one_caption(resumed, tmp_path):
    """describe.py's greedy captions equal stock transformers' (AutoModelForImageTextToText, AutoTokenizer,
    AutoImageProcessor and the exported chat template: no expblip code on that side)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from expblip.data.synthetic import synthetic_records

    _, run, _ = resumed
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, record in enumerate(synthetic_records(4, seed=5, split="val")):
        record["image"].save(faces / f"{i}.png")
    proc = run_launcher([sys.executable, "launch/describe.py", "--model", str(run), "--beams", "1",
                         "--max-new-tokens", "12", "--json", str(faces)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [json.loads(line)["caption"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(ours) == 4 and all(ours)

    export = run / "export"
    stock = AutoModelForImageTextToText.from_pretrained(export).eval()
    tok, image_processor = AutoTokenizer.from_pretrained(export), AutoImageProcessor.from_pretrained(export)
    pixels = image_processor(images=[Image.open(faces / f"{i}.png").convert("RGB") for i in range(4)],
                             return_tensors="pt")
    tokens = int(pixels["image_grid_thw"][0].prod()) // 4  # 2 x 2 patches merge into one LM token
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    text = tok.apply_chat_template(messages, chat_template=(export / "chat_template.jinja").read_text(),
                                   tokenize=False, add_generation_prompt=True)
    ids = tok([text.replace("<|image_pad|>", "<|image_pad|>" * tokens)] * 4, return_tensors="pt",
              add_special_tokens=False)
    with torch.no_grad():
        generated = stock.generate(**ids, **pixels, mm_token_type_ids=(ids["input_ids"] == tok.image_token_id).int(),
                                   num_beams=1, do_sample=False, max_new_tokens=12, min_new_tokens=3)
    theirs = [t.strip() for t in tok.batch_decode(generated[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert theirs == ours


def test_a_stage_the_family_lacks_a_trainable_export_and_other_image_sizes_are_refused_before_training(tiny_shards, tmp_path):
    from expblip.config import ConfigError, load_config
    from expblip.train.loop import preflight

    base = [f"data.train.shards={tiny_shards['train']}", f"train.run_dir={tmp_path / 'run'}"]
    for override, message in (("train.stage=stage1", "trains in stages vision, stage2"),
                              ("train.export=both", "writes full exports only; set train.export=full"),
                              ("data.train.image_size=56", r"takes 64 px images; set data.train.image_size=64")):
        with pytest.raises(ConfigError, match=message):
            preflight(load_config(RECIPE, [*base, override]), wait_for_storage=False)
    assert preflight(load_config(RECIPE, base), wait_for_storage=False) == ""  # the recipe as it is passes


def test_exporting_a_qwen_checkpoint_is_refused_with_the_way_to_its_export(resumed, tmp_path):
    from expblip.config import ConfigError
    from expblip.train.export import export_checkpoint

    _, run, _ = resumed
    with pytest.raises(ConfigError, match=r"qwen2_5_vl run .* use that, or resume the run to its end"):
        export_checkpoint(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_server_and_its_openai_api_serve_the_qwen_export(resumed, tmp_path):
    """The HTTP app and the OpenAI chat API take the Qwen2.5-VL export as they take BLIP-2's (the family read from
    its config.json): the answer is the captioner's greedy caption, the usage counts its chat prompt."""


    from expblip.data.synthetic import synthetic_records
    from expblip.infer.captioner import Captioner
    from expblip.model.generation import GenerationConfig

    _, run, _ = resumed
    captioner = Captioner.from_export(run / "export")
    gen = GenerationConfig(num_beams=1, max_new_tokens=12)
    face = tmp_path / "face.png"
    next(iter(synthetic_records(1, seed=7, split="val")))["image"].save(face)
    want = captioner.caption_pixels(captioner.preprocess([Image.open(face)]), gen, with_lengths=True)[0]
    answer = ask_openai_api(captioner, face.read_bytes(), gen)
    assert answer.choices[0].message.content == want.text
    assert answer.usage.completion_tokens == want.tokens
    assert answer.usage.prompt_tokens == captioner.prompt_length() > 16  # the chat turns around 16 image tokens
