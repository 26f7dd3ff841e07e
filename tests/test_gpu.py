"""The bf16 policy on a device: a bf16 step moves the loss with fp32 masters, and bf16 generation from a trained
tiny export gives the fp32 captions. Each test runs on the CPU always and on CUDA (`pytest -m gpu`, skipped with a
reason without a GPU). Imports only PyTorch, transformers and expblip's model/infer code: on a GPU machine that has
nothing else, run `PYTHONPATH=. pytest -m gpu tests/test_gpu.py`. Also checks bench/gpu_step.py's FLOP count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from expblip.model.blip2 import (
    CaptionModel,
    GenerationConfig,
    ModelConfig,
    apply_freezing,
    build_model,
    caption_inputs,
)

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False): not measured on a GPU")])
DEVICES = ["cpu", CUDA]
CAPTIONS = ["the face shows happiness and raises cheek.", "it is a people who lowers brow and drops jaw."]


def _tokenizer():
    from expblip.model.tokenizer import train_caption_tokenizer

    return train_caption_tokenizer(CAPTIONS * 20, vocab_size=300)


def _images(n: int = 2):
    import random

    from expblip.data.synthetic import draw_face

    return [draw_face(aus, random.Random(i), 64) for i, aus in enumerate([[6, 12], [4, 26]][:n])]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_moves_the_loss_with_fp32_masters(device):
    """Frozen ViT and OPT in bf16, compute in bf16 (autocast), the trained Q-Former's weights and Adam states fp32."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(frozen_dtype="bfloat16", dropout=0.0)
    blip2 = build_model(cfg, tokenizer, init=True)
    apply_freezing(blip2, cfg, "stage2", others_dtype=torch.float32)
    unit = CaptionModel(blip2).to(device).train()
    dtypes = {name.split(".")[0]: p.dtype for name, p in blip2.named_parameters()}
    assert dtypes["vision_model"] == dtypes["language_model"] == torch.bfloat16
    assert dtypes["qformer"] == dtypes["language_projection"] == dtypes["query_tokens"] == torch.float32
    trained = [p for p in unit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    inputs = {k: v.to(device) for k, v in caption_inputs(tokenizer, CAPTIONS, 8, 24).items()}
    pixels = torch.randn(2, 3, 64, 64, device=device)
    losses = []
    for _ in range(6):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = unit(pixel_values=pixels, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert losses[-1] < losses[0] - 0.05, losses


def _trained_export(device: str, out: Path) -> Path:
    """Every part of a tiny BLIP-2 trained until it tells two faces apart by their captions; exported."""
    from expblip.infer.captioner import preprocess_images
    from expblip.model.weights import export_hf
    from expblip.pixels import CLIP_MEAN, CLIP_STD

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(freeze_vision=False, freeze_lm=False, dropout=0.0)
    blip2 = build_model(cfg, tokenizer)
    apply_freezing(blip2, cfg, "stage2")
    unit = CaptionModel(blip2).to(device).train()
    optimizer = torch.optim.AdamW(unit.parameters(), lr=3e-3)
    pixels = preprocess_images(_images(), 64, CLIP_MEAN, CLIP_STD).to(device)
    inputs = {k: v.to(device) for k, v in caption_inputs(tokenizer, CAPTIONS, 8, 24).items()}
    for _ in range(150):
        loss = unit(pixel_values=pixels, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < 0.05, float(loss)
    return export_hf({k: v.cpu() for k, v in blip2.state_dict().items()}, blip2.config, tokenizer, out)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_generation_on_a_trained_tiny_export_gives_the_fp32_caption(device, tmp_path):
    from expblip.infer.captioner import Captioner

    export = _trained_export(device, tmp_path / "export")
    gen = GenerationConfig(num_beams=1, max_new_tokens=24)
    fp32 = Captioner.from_export(export, device=device, dtype="fp32")
    bf16 = Captioner.from_export(export, device=device, dtype="bf16")
    dtypes = {n.split(".")[0]: p.dtype for n, p in bf16.model.named_parameters()}
    assert dtypes["vision_model"] == dtypes["language_model"] == torch.bfloat16  # loaded in bf16 ...
    assert dtypes["qformer"] == torch.float32  # ... but the Q-Former, as transformers keeps it
    assert fp32.caption(_images(), gen) == CAPTIONS  # it learnt them
    assert bf16.caption(_images(), gen) == fp32.caption(_images(), gen)


def test_gpu_step_counts_the_flops_the_step_must_do():
    """bench/gpu_step.py's count on the tiny preset: 2 FLOPs per weight per token for each linear layer, ViT
    forward once, Q-Former 3x (forward and backward), OPT 2x (forward and its activations' backward)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_step

    torch.manual_seed(0)
    unit, config = gpu_step.build("tiny", (), device="cpu")
    inputs = gpu_step.batch(config, 2, 10, device="cpu")
    flops = gpu_step.step_flops(unit, inputs, config)
    blip2, b = unit.blip2, 2
    v, t = config.vision_config, config.text_config
    s_v, s_t = (v.image_size // v.patch_size) ** 2 + 1, inputs["input_ids"].shape[1]

    def linear(module) -> int:
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))

    patch = 2 * b * (s_v - 1) * v.hidden_size * 3 * v.patch_size**2
    vit = 2 * b * s_v * linear(blip2.vision_model) + patch + b * v.num_hidden_layers * 4 * s_v**2 * v.hidden_size
    assert flops["vision_model"] == pytest.approx(vit)
    opt = 2 * b * s_t * linear(blip2.language_model) + b * t.num_hidden_layers * 4 * s_t**2 * t.hidden_size
    assert flops["language_model"] == pytest.approx(2 * opt)
    assert flops["language_projection"] == pytest.approx(3 * 2 * b * config.num_query_tokens
                                                         * linear(blip2.language_projection))


def test_describe_and_evaluate_take_dtype(tmp_path, capsys, tiny_shards, monkeypatch):
    """launch/describe.py --dtype bf16 prints the fp32 captions; launch/evaluate.py --dtype loads the model so."""
    from conftest import launch_module

    from expblip.infer.captioner import Captioner

    export = _trained_export("cpu", tmp_path / "export")
    paths = []
    for i, image in enumerate(_images()):
        paths.append(str(tmp_path / f"face{i}.png"))
        image.save(paths[-1])
    describe = launch_module("describe").main
    printed = {}
    for dtype in ("fp32", "bf16"):
        assert describe(["--model", str(export), "--dtype", dtype, "--beams", "1", *paths]) == 0
        printed[dtype] = [line.split(": ", 1)[1].split("  [")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed["bf16"] == printed["fp32"] == CAPTIONS
    loads = []
    original = Captioner.from_export.__func__
    monkeypatch.setattr(Captioner, "from_export", classmethod(
        lambda cls, *a, **kw: loads.append(kw.get("dtype")) or original(cls, *a, **kw)))
    assert launch_module("evaluate").main(["--model", str(export), "--shards", str(tiny_shards["test"]), "--limit",
                                           "4", "--beams", "1", "--no-caption-metrics", "--no-progress",
                                           "--dtype", "bf16"]) == 0
    assert loads == ["bf16"] and "held-out mean AU F1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        describe(["--model", str(export), "--dtype", "fp8", *paths])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script measures instead of skipping")
def test_gpu_step_skips_with_its_reason_without_a_gpu(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_step

    assert gpu_step.main([]) == 0
    assert capsys.readouterr().out.strip() == ("gpu_step: skipped: no CUDA device (torch.cuda.is_available() is "
                                               "False); not measured on a GPU")
