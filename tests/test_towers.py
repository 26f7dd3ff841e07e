"""Towers from their own sources: the ViT from EVA's eva_vit_g.pth (or any BLIP-2), the language model from its HF
directory as published (its config.json shapes the LM, its tokenizer is the run's), the Q-Former from a BLIP-2
of another LM, as a paper-scale run on a modern LM starts (model.vision_weights, model.lm_weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from expblip.config import ConfigError
from expblip.data.synthetic import synthetic_records
from expblip.model.blip2 import CaptionModel, ModelConfig, build_model
from expblip.model.tokenizer import train_caption_tokenizer
from expblip.model.weights import export_hf, lm_names, open_towers
from expblip.train.load import load_initial_weights

CAPTIONS = [c for r in synthetic_records(40, seed=1) for c in r["captions"]]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    """Three sources: a Qwen-family LM directory (3 layers and its own rope theta, unlike the preset's 2 layers),
    EVA's bare ViT file (LAVIS loads it into visual_encoder), and a BLIP-2 of a tiny OPT for the Q-Former."""
    from test_weights import to_lavis

    root = tmp_path_factory.mktemp("towers")
    qtok = train_caption_tokenizer(CAPTIONS, vocab_size=300, family="qwen2")
    torch.manual_seed(1)
    lm = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(qtok),
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1234.0}))
    lm.save_pretrained(root / "qwen", max_shard_size="60KB")  # sharded + index, as published
    qtok.save_pretrained(root / "qwen")

    torch.manual_seed(2)
    eva = build_model(ModelConfig(preset="tiny-qwen2.5"), qtok).state_dict()
    with torch.no_grad():  # EVA's attention has q and v biases, no k bias
        for k in eva:
            if k.endswith("self_attn.qkv.bias"):
                eva[k][eva[k].numel() // 3 : 2 * eva[k].numel() // 3] = 0
    vision = {k: v for k, v in eva.items() if k.startswith("vision_model.") and "post_layernorm" not in k}
    bare = {k.removeprefix("visual_encoder."): v for k, v in to_lavis(vision).items()}
    assert "blocks.0.attn.q_bias" in bare and "patch_embed.proj.weight" in bare
    torch.save(bare, root / "eva_vit_g.pth")

    otok = train_caption_tokenizer(CAPTIONS, vocab_size=300)
    torch.manual_seed(3)
    opt = build_model(ModelConfig(preset="tiny"), otok)
    export_hf(opt.state_dict(), opt.config, otok, root / "blip2-opt")
    return {"root": root, "tok": qtok, "lm": lm.state_dict(), "vision": vision, "opt": opt.state_dict()}


def _cfg(towers: dict, **kw) -> ModelConfig:
    root = towers["root"]
    return ModelConfig(preset="tiny-qwen2.5", weights=str(root / "blip2-opt"), vision_weights=str(
        root / "eva_vit_g.pth"), lm_weights=str(root / "qwen"), **kw)


def test_each_tower_comes_from_its_own_source_and_the_lm_from_its_own_config(towers):
    cfg = _cfg(towers, allow_missing=("language_projection.**", "vision_model.post_layernorm.**"))
    unit = CaptionModel(build_model(cfg, towers["tok"], init=False))
    text = unit.blip2.config.text_config
    assert text.num_hidden_layers == 3 and text.rope_parameters["rope_theta"] == 1234.0  # the directory's config
    source = open_towers(cfg.weights, cfg.vision_weights, cfg.lm_weights)
    report = load_initial_weights(unit, source, cfg.allow_missing, 0)
    got = {k.removeprefix("blip2."): v for k, v in unit.state_dict().items()}
    for key, value in towers["lm"].items():
        assert torch.equal(got[f"language_model.{key}"], value), key
    for key, value in towers["vision"].items():
        assert torch.equal(got[key], value), key
    qformer = [k for k in towers["opt"] if k.startswith(("qformer.", "query_tokens"))]
    assert qformer and all(torch.equal(got[k], towers["opt"][k]) for k in qformer)
    # the projection into OPT's space does not come along: a new one starts, as transformers initialises it
    assert sorted(n for s in report.allowed for n in s.names) == [
        "language_projection.bias", "language_projection.weight", "vision_model.post_layernorm.bias",
        "vision_model.post_layernorm.weight"]
    assert torch.all(got["language_projection.bias"] == 0) and got["language_projection.weight"].std() > 0
    assert torch.all(got["vision_model.post_layernorm.weight"] == 1)
    # what the base holds beyond the towers it still gives (OPT, its projection, its ViT) is listed, not used
    unused = source.unused[str(towers["root"] / "blip2-opt")]
    assert any(k.startswith("language_model.model.decoder.") for k in unused)
    assert "language_projection.weight" in unused and any(k.startswith("vision_model.") for k in unused)


def test_a_projection_or_post_layernorm_that_no_source_has_is_an_error_naming_it(towers):
    cfg = _cfg(towers)
    unit = CaptionModel(build_model(cfg, towers["tok"], init=False))
    source = open_towers(cfg.weights, cfg.vision_weights, cfg.lm_weights)
    with pytest.raises(ConfigError, match=r"missing 4: .*language_projection\.(weight|bias)") as err:
        load_initial_weights(unit, source, (), 0)
    assert "lm_weights=" in str(err.value) and "model.allow_missing" in str(err.value)
    assert "vision_model.post_layernorm.weight" in str(err.value)  # EVA's file has no ln_vision: BLIP-2 adds it


def test_an_lm_of_another_family_is_refused_naming_the_key(towers):
    opt_lm = towers["root"] / "opt_lm"
    torch.manual_seed(0)
    build_model(ModelConfig(preset="tiny"), train_caption_tokenizer(CAPTIONS, vocab_size=300)).language_model \
        .save_pretrained(opt_lm)
    with pytest.raises(ValueError, match=r"model.lm_weights .*opt_lm holds a 'opt' model but model.preset "
                                         r"tiny-qwen2.5 is a qwen2 preset"):
        build_model(ModelConfig(preset="tiny-qwen2.5", lm_weights=str(opt_lm)), towers["tok"])
    with pytest.raises(FileNotFoundError, match=r"model.lm_weights .*nowhere has no config.json"):
        build_model(ModelConfig(preset="tiny-qwen2.5", lm_weights=str(towers["root"] / "nowhere")), towers["tok"])
    with pytest.raises(FileNotFoundError, match=r"model.lm_weights .*nowhere does not exist"):
        open_towers(lm=str(towers["root"] / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"model.vision_weights .*eva.pt does not exist"):
        open_towers(str(towers["root"] / "blip2-opt"), vision=str(towers["root"] / "eva.pt"))


def test_lm_names_follow_transformers_prefix_rules():
    causal = lm_names({"model.layers.0.mlp.up_proj.weight": 0, "lm_head.weight": 0})
    assert causal == {"language_model.model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
                      "language_model.lm_head.weight": "lm_head.weight"}
    bare = lm_names({"decoder.embed_tokens.weight": 0})  # OPT's original checkpoints: the base model's names
    assert bare == {"language_model.model.decoder.embed_tokens.weight": "decoder.embed_tokens.weight"}
    blip2 = lm_names({"language_model.lm_head.weight": 0, "qformer.layernorm.weight": 0})
    assert blip2 == {"language_model.lm_head.weight": "language_model.lm_head.weight"}


def test_the_run_takes_the_tokenizer_from_the_lm_directory(towers, tmp_path):
    from expblip.config import load_config
    from expblip.train.loop import _tokenizer

    cfg = load_config(None, [f"model.{k}={v}" for k, v in vars(_cfg(towers)).items()
                             if k in ("preset", "weights", "vision_weights", "lm_weights")])
    tok = _tokenizer(cfg, 0, tmp_path)
    assert tok.get_vocab() == towers["tok"].get_vocab()
    assert re.fullmatch(r"weights=.*blip2-opt \+ vision_weights=.*eva_vit_g\.pth \+ lm_weights=.*qwen",
                        cfg.model.weights_id)
    assert Path(cfg.model.lm_weights, "model.safetensors.index.json").is_file()


# Qwen/Qwen2.5-7B-Instruct's config.json as published (written by transformers 4.43: rope_theta, torch_dtype)
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}


def test_a_published_lm_config_builds_the_paper_scale_model_at_its_real_shape(tmp_path):
    """vitg-qwen2.5-7b from Qwen's own config.json, on the meta device (no memory): the LM is 7.6 B parameters with
    Qwen's rope theta, the projection maps the Q-Former's 768 into Qwen's 3584, and every LM tensor carries the name
    the published checkpoint gives it under language_model."""
    import json

    from expblip.train.plan import _VocabOnly

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_INSTRUCT))
    cfg = ModelConfig(preset="vitg-qwen2.5-7b", lm_weights=str(tmp_path))
    tok = _VocabOnly(151665, "qwen2")
    with torch.device("meta"):
        model = build_model(cfg, tok)
    text = model.config.text_config
    assert text.rope_parameters["rope_theta"] == 1e6 and not text.tie_word_embeddings
    assert text.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # the tokenizer's ids, not the file's
    lm = sum(p.numel() for p in model.language_model.parameters())
    assert lm == pytest.approx(7.616e9, rel=1e-3), lm  # Qwen2.5-7B: 7.61 B
    assert tuple(model.language_projection.weight.shape) == (3584, 768)
    names = {k for k in model.state_dict() if k.startswith("language_model.")}
    published = {"model.embed_tokens.weight", "model.layers.27.self_attn.q_proj.bias", "model.norm.weight",
                 "lm_head.weight"}
    assert {f"language_model.{k}" for k in published} <= names
    assert set(lm_names(dict.fromkeys(published))) <= names
