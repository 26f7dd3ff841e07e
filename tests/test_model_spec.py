"""The model interface (expblip.model.spec): the loop, the evaluator, the server and the inference core call a
family's spec; none of them imports a family's module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from expblip.model.spec import families, spec_for_config, spec_for_preset

ROOT = Path(__file__).resolve().parents[1]
FAMILY_MODULES = {"expblip.model.blip2", "expblip.model.stage1", "expblip.model.qwen_vl"}
# the rooms that must see models only through the interface
CALLERS = ["expblip/train/loop.py", "expblip/train/heldout.py", "expblip/train/engine.py", "expblip/eval",
           "expblip/serve", "expblip/infer", "expblip/pipeline"]


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (at top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _files(where: str) -> list[Path]:
    path = ROOT / where
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def test_loop_evaluator_server_and_inference_import_the_interface_not_a_family():
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FAMILY_MODULES)
                 for where in CALLERS for f in _files(where) if _imports(f) & FAMILY_MODULES}
    assert offenders == {}
    users = {str(f.relative_to(ROOT)) for where in CALLERS for f in _files(where)
             if "expblip.model.spec" in _imports(f)}
    assert {"expblip/train/loop.py", "expblip/train/heldout.py", "expblip/infer/captioner.py"} <= users


def test_the_import_check_sees_a_family_import(tmp_path):
    """The drawing test can fail: a caller importing blip2 inside a function is found."""
    caller = tmp_path / "caller.py"
    caller.write_text("def f():\n    from expblip.model.blip2 import generate_captions\n    return generate_captions\n")
    assert _imports(caller) & FAMILY_MODULES == {"expblip.model.blip2"}


def test_presets_and_export_configs_find_their_family_and_unknown_ones_name_the_choices():
    assert spec_for_preset("tiny").name == "blip2"
    assert spec_for_preset("vitg-opt6.7b").architecture == "Blip2ForConditionalGeneration"
    assert spec_for_config({"model_type": "blip-2"}).name == "blip2"
    with pytest.raises(ValueError, match=r"model.preset 'nope' does not exist; choose one of .*tiny"):
        spec_for_preset("nope")
    with pytest.raises(ValueError, match=r"model type 'llava' is not a family expblip knows; known: .*blip-2"):
        spec_for_config({"model_type": "llava"})
    presets = [p for spec in families().values() for p in spec.presets]
    assert len(presets) == len(set(presets))  # a preset belongs to one family


def test_blip2_through_the_interface_is_blip2_itself():
    """Captions, prompt lengths and training inputs through the spec equal the BLIP-2 functions' own."""
    from expblip.model import blip2
    from expblip.model.generation import GenerationConfig
    from expblip.model.tokenizer import train_caption_tokenizer

    tok = train_caption_tokenizer(["a face with lip corner puller", "inner brow raiser and jaw drop"] * 4, 300)
    torch.manual_seed(0)
    model = blip2.build_model(blip2.ModelConfig(preset="tiny"), tok).eval()
    spec = spec_for_preset("tiny")
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    gen = GenerationConfig(num_beams=1, max_new_tokens=6, min_new_tokens=0)
    for prompt in ("", "Name the emotion."):
        ours = spec.generate(model, tok, spec.pixel_inputs(model.config, pixels), gen, prompt, with_lengths=True)
        assert ours == blip2.generate_captions(model, tok, pixels, gen, prompt, with_lengths=True)
        assert spec.prompt_length(model.config, tok, prompt) == blip2.prompt_ids(model, tok, prompt, 1).shape[1]
    captions, prompts = ["a face with jaw drop", "inner brow raiser"], ["", "List the active action units."]
    got = spec.text_inputs(tok, model.config, captions, prompts, 16)
    want = blip2.caption_inputs(tok, captions, model.config.num_query_tokens, 16, prompts)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_plan_counts_qwen25_vl_7b_for_full_and_lora_fine_tuning(capsys):
    """plan.py counts the native VLM per tower as its module does (the published shapes), full fine-tuning trains
    every parameter, LoRA only the merger and the adapters; launch/plan.py prints both on 8 x 80 GB."""
    from expblip.model import qwen_vl
    from expblip.train.plan import PlanConfig, count_params, make_plan
    from tests.conftest import launch_module

    want = qwen_vl.plan_counts(qwen_vl.preset_dims("qwen2.5-vl-7b"))
    full = count_params("qwen2.5-vl-7b")
    assert (full.vision + full.projection, full.projection, full.lm) == (want["vision"] + want["merger"],
                                                                         want["merger"], want["lm"])
    assert full.trainable("all") == full.total == want["total"]
    lora = count_params("qwen2.5-vl-7b", lora_r=16)
    assert lora.trainable("qformer") == lora.projection + lora.adapters and 0 < lora.adapters < 0.01 * lora.lm
    plans = [make_plan(PlanConfig(preset="qwen2.5-vl-7b", trainable=t, lora_r=r, checkpointing=("vision", "lm")))
             for t, r in (("all", 0), ("qformer", 16))]
    assert plans[0].row("zero3").states_gpu > 4 * plans[1].row("zero3").states_gpu  # Adam states of every weight
    assert launch_module("plan").main(["--preset", "qwen2.5-vl-7b", "--trainable", "all"]) == 0
    assert "qwen2.5-vl-7b: 8,292M parameters" in capsys.readouterr().out
    with pytest.raises(ValueError, match="CPU test model"):
        count_params("tiny-qwen2.5-vl")


def test_qwen_vl_checkpointing_recomputes_the_same_loss_and_gradients():
    """model.checkpointing [vision, lm] on a Qwen2.5-VL: the same loss and gradients as without, with the towers'
    layers recomputed in backward (transformers' per-layer checkpointing, as BLIP-2's towers)."""
    from expblip.model import qwen_vl as q
    from expblip.model.blip2 import ModelConfig

    spec = spec_for_preset("tiny-qwen2.5-vl")
    processor = q.make_processor(q.tiny_tokenizer(["a face that raises cheek", "a face that drops jaw"] * 4, 300))
    results = []
    for towers in ((), ("vision", "lm")):
        torch.manual_seed(0)
        model = spec.build(ModelConfig(preset="tiny-qwen2.5-vl", dropout=0.0), processor)
        spec.checkpointing(model, towers)
        flagged = {n.split(".")[1] for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)}
        assert flagged == ({"visual", "language_model"} if towers else set())  # the towers' layers recompute
        model.train()
        pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        from expblip.pixels import normalise

        inputs = {**spec.text_inputs(processor, model.config, ["a face that raises cheek", "drops jaw"], None, 16),
                  **spec.pixel_inputs(model.config, normalise(pixels))}
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert ckpt == pytest.approx(plain, rel=1e-6) and plain_grads.keys() == ckpt_grads.keys()
    assert all(torch.allclose(plain_grads[n], ckpt_grads[n], atol=1e-6) for n in plain_grads)
    with pytest.raises(ValueError, match="Qwen2.5-VL has towers"):
        spec.checkpointing(model, ("qformer",))
