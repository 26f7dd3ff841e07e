"""Modern LM families, LoRA and their exports: tiny Qwen2.5 / Llama-3 presets, adapters on a frozen LM (a small
fraction of it trains), the trainable export, merging, plan.py's adapter counts, and (slow) a LoRA run under ZeRO-3
that resumes exactly and whose merged export stock transformers serves with the same captions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import launch_module

from expblip.data.synthetic import synthetic_records
from expblip.model.blip2 import ModelConfig, apply_freezing, build_model, caption_inputs
from expblip.model.family import FAMILIES, IMAGE_TOKEN
from expblip.model.lora import LoraSettings, base_name, is_adapter, merge_adapters
from expblip.model.tokenizer import caption_end_id, image_token_id, train_caption_tokenizer

CAPTIONS = [c for r in synthetic_records(40, seed=1) for c in r["captions"]]
TINY = {"tiny": "opt", "tiny-qwen2.5": "qwen2", "tiny-llama3": "llama"}
PROMPT = "List the active action units."


def tiny(preset: str, lora: LoraSettings | None = None, seed: int = 0):
    """(model, tokenizer) of a tiny preset, its tokenizer trained in the preset's family conventions."""
    tok = train_caption_tokenizer(CAPTIONS + [PROMPT], vocab_size=300, family=TINY[preset])
    torch.manual_seed(seed)
    cfg = ModelConfig(preset=preset, dropout=0.0, lora=lora or LoraSettings())  # type: ignore[arg-type]
    return build_model(cfg, tok), tok, cfg


@pytest.mark.parametrize("preset", list(TINY))
def test_tiny_preset_of_each_family_ends_captions_and_lays_out_prompts_as_its_family(preset):
    model, tok, _ = tiny(preset)
    family = FAMILIES[TINY[preset]]
    assert model.config.text_config.model_type == family.name
    end = tok.convert_tokens_to_ids(family.caption_end) if family.name != "opt" else tok("\n")["input_ids"][-1]
    assert caption_end_id(tok) == end == model.config.text_config.eos_token_id
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_index
    if family.image_slot:  # Llama-3: <image> takes a reserved token's id, no new embedding row
        assert image_token_id(tok) == list(family.tiny_special_tokens).index(family.image_slot)

    caption = CAPTIONS[0]
    inputs = caption_inputs(tok, [caption, caption], num_query=8, max_tokens=40, prompts=[PROMPT, ""])
    ids, labels = inputs["input_ids"], inputs["labels"]
    prompted = tok.decode(ids[0][: (labels[0] != -100).nonzero()[0].item()])
    bos = family.bos or ""
    assert prompted == IMAGE_TOKEN * 8 + bos + family.prompt_text(PROMPT)  # the family's chat turn (OPT: as is)
    plain = tok.decode(ids[1][: (labels[1] != -100).nonzero()[0].item()])
    assert plain == IMAGE_TOKEN * 8 + bos  # no instruction: the paper's prompt
    for label in labels:
        answer = label[label != -100]
        assert answer[-1].item() == end  # every caption ends with the family's end token, which counts in the loss
        assert tok.decode(answer[:-1]).strip() == caption.strip()
    # the model takes the batch: one loss over the answer tokens only (the prompt does not count, see below)
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    assert torch.isfinite(model(**inputs, pixel_values=pixels).loss)


def test_the_loop_masks_each_task_prompt_and_trains_its_answer():
    """The loop's own batch building with a three-task mixture: every prompt token is -100, the labels spell the
    task's answer (AU names, an emotion, the caption) and its end token, and the mixture uses all three tasks."""
    from types import SimpleNamespace

    from expblip.config import load_config
    from expblip.data.tasks import au_answer, emotion_answer
    from expblip.model.blip2 import blip2_config
    from expblip.train.loop import model_inputs

    cfg = load_config(None, ["model.preset=tiny-qwen2.5", "train.stage=lm", "tasks.aus.weight=1",
                             "tasks.emotion.weight=1", "tasks.describe.weight=1"])
    records = list(synthetic_records(24, seed=3))
    from expblip.data.tasks import task_vocabulary

    tok = train_caption_tokenizer(CAPTIONS + task_vocabulary(cfg.tasks), vocab_size=400, family="qwen2")
    run = SimpleNamespace(cfg=cfg, step=5, tokenizer=tok, blip2_config=blip2_config(cfg.model, tok),
                          engine=SimpleNamespace(device=torch.device("cpu")))
    batch = {"captions": [r["captions"][0] for r in records], "labels": [r["labels"] for r in records],
             "keys": [f"face-{i}" for i in range(len(records))]}
    inputs = model_inputs(run, batch)
    prompts = {v: k for k, v in cfg.tasks.prompts().items()}
    seen = set()
    for ids, labels, caption, lab in zip(inputs["input_ids"], inputs["labels"], batch["captions"], batch["labels"],
                                         strict=True):
        first = (labels != -100).nonzero()[0].item()
        head = tok.decode(ids[:first])
        asked = [task for prompt, task in prompts.items() if prompt and prompt in head] or ["describe"]
        task = asked[0]
        seen.add(task)
        assert (labels[:first] == -100).all() and (labels[first:] != -100).sum() == (ids[first:] != tok.pad_token_id
                                                                                      ).sum()
        if task == "aus":
            want = au_answer(lab["aus"])
        elif task == "emotion":
            want = emotion_answer(lab["emotions"])
        else:
            want = caption.strip()
        answer = labels[labels != -100]
        assert tok.decode(answer[:-1]).strip() == want and answer[-1].item() == caption_end_id(tok)
    assert seen == {"describe", "aus", "emotion"}


def test_recipe_lora_trains_under_a_tenth_of_the_lm_and_leaves_its_weights_frozen():
    from expblip.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "tiny_qwen_lora.yaml",
                      ["model.weights=", "model.freeze_vision=true"])
    assert cfg.model.preset == "tiny-qwen2.5" and tuple(cfg.model.lora.towers) == ("lm",)
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=cfg.model.tokenizer_vocab, family="qwen2")
    model = build_model(cfg.model, tok)
    apply_freezing(model, cfg.model, cfg.train.stage)
    lm = {n: p for n, p in model.language_model.named_parameters()}
    base = sum(p.numel() for n, p in lm.items() if not is_adapter(n))
    trained = {n: p for n, p in lm.items() if p.requires_grad}
    assert trained and all(is_adapter(n) for n in trained)  # the LM's own weights stay frozen
    fraction = sum(p.numel() for p in trained.values()) / base
    assert 0.01 < fraction <= 0.10, fraction
    # adapters on the family's 7 projections of both layers (A and B each)
    layers = {re.sub(r"\.lora_[AB]\..*", "", n) for n in trained}
    assert len(layers) == 7 * model.config.text_config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(FAMILIES["qwen2"].lora_targets)
    # stage 2 trains the adapters beside the Q-Former, queries and projection; the ViT here is frozen
    outside = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and not is_adapter(n)}
    assert outside == {"qformer", "query_tokens", "language_projection"}


def test_trainable_export_keys_are_the_adapters_qformer_queries_and_projection():
    from expblip.config import load_config
    from expblip.model.blip2 import blip2_config
    from expblip.train.export import trainable_keys

    cfg = load_config(None, ["model.preset=tiny-qwen2.5", "train.stage=stage2", "model.lora.towers=[lm]",
                             "model.lora.r=4"])
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=300, family="qwen2")
    keys = trainable_keys(cfg, blip2_config(cfg.model, tok))
    assert {k.split(".")[0] for k in keys} == {"qformer", "query_tokens", "language_projection", "language_model"}
    lm = [k for k in keys if k.startswith("language_model.")]
    assert lm and all(is_adapter(k) for k in lm)
    assert not any(k.startswith("vision_model.") for k in keys)


def test_merged_adapters_give_the_adapter_model_s_logits_in_a_plain_blip2():
    lora = LoraSettings(towers=("lm", "qformer"), r=4, alpha=16, dropout=0.0)
    model, tok, _ = tiny("tiny-llama3", lora)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (a fresh adapter changes nothing): give the adapters something to fold
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    plain, _, _ = tiny("tiny-llama3")
    state = model.state_dict()
    merged = {k: (v.contiguous() if not isinstance(v, torch.Tensor) else v)
              for k, v in merge_adapters(state, lora.scale).items()}
    assert not any(is_adapter(k) for k in merged) and set(merged) == set(plain.state_dict())
    inputs = caption_inputs(tok, CAPTIONS[:2], num_query=8, max_tokens=20)
    pixels = torch.randn(2, 3, 64, 64)
    model.eval(), plain.eval()
    with torch.no_grad():
        want = model(**inputs, pixel_values=pixels).logits
        plain.load_state_dict({base_name(k): v for k, v in state.items() if not is_adapter(k)})
        unmerged = plain(**inputs, pixel_values=pixels).logits  # the base weights alone
        plain.load_state_dict(merged)
        got = plain(**inputs, pixel_values=pixels).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (unmerged - want).abs().max() > 1e-2  # the adapters matter: without them the logits differ


def _lora_params(text_config, r: int, targets) -> int:
    """r * (in + out) over the LM's linear layers named by `targets`, from the config's own dimensions."""
    h, layers = text_config.hidden_size, text_config.num_hidden_layers
    head = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    kv = text_config.num_key_value_heads * head
    shapes = {"q_proj": (h, text_config.num_attention_heads * head), "k_proj": (h, kv), "v_proj": (h, kv),
              "o_proj": (text_config.num_attention_heads * head, h), "gate_proj": (h, text_config.intermediate_size),
              "up_proj": (h, text_config.intermediate_size), "down_proj": (text_config.intermediate_size, h)}
    return layers * sum(r * sum(shapes[t]) for t in targets)


def test_plan_presets_table_counts_lora_adapters_of_the_new_presets(capsys):
    from expblip.model.blip2 import _LM, PRESETS

    assert launch_module("plan").main(["--presets", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == set(PRESETS)
    from transformers import LlamaConfig, Qwen2Config

    for preset, config_class in (("vitg-qwen2.5-7b", Qwen2Config), ("vitg-llama3-8b", LlamaConfig),
                                 ("vitg-llama3.2-1b", LlamaConfig)):
        family, dims = _LM[PRESETS[preset][2]]
        text = config_class(**dims)
        want = _lora_params(text, 16, FAMILIES[family].lora_targets)
        row = rows[preset]
        assert row[1] == family
        adapters_m = float(row[4].rstrip("M").replace(",", ""))
        assert adapters_m == pytest.approx(want / 1e6, abs=0.006), (preset, row, want)
        lm_m = float(row[3].rstrip("M").replace(",", ""))
        assert float(row[5].rstrip("%")) == pytest.approx(100 * adapters_m / lm_m, abs=0.01)
    # public figures for r 16 on every projection: Qwen2.5-7B 40.4M, Llama-3-8B 41.9M adapter parameters
    assert float(rows["vitg-qwen2.5-7b"][4].rstrip("M")) == pytest.approx(40.37, abs=0.01)
    assert float(rows["vitg-llama3-8b"][4].rstrip("M")) == pytest.approx(41.94, abs=0.01)


def test_plan_one_preset_with_lora_names_the_adapters(capsys):
    assert launch_module("plan").main(["--preset", "vitg-qwen2.5-7b", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("LoRA r=16"))
    assert "lm 40.37M adapters (0.53% of the lm)" in line, line
