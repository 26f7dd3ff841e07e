"""Weight import: LAVIS names -> transformers' Blip2 names with exact key reports, sharded HF dirs, safe loading."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from expblip.model.blip2 import CaptionModel, ModelConfig, build_model
from expblip.model.tokenizer import train_caption_tokenizer
from expblip.model.weights import (
    TowerMismatchError,
    UnsafeCheckpointError,
    check_towers,
    fingerprint,
    import_hf_dir,
    import_lavis,
    load_into_model,
    save_hf_dir,
)


@pytest.fixture(scope="module")
def tokenizer():
    captions = ["It is a people who raises inner eyebrow and drops jaw.", "The face shows happiness."] * 20
    return train_caption_tokenizer(captions, vocab_size=300)


def tiny(tokenizer, seed: int):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), tokenizer)
    with torch.no_grad():  # EVA has q and v biases but no k bias: give q and v values, k zeros
        for layer in model.vision_model.encoder.layers:
            bias = layer.self_attn.qkv.bias
            bias.normal_()
            bias[bias.numel() // 3 : 2 * bias.numel() // 3] = 0
    return model


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the inverse mapping, written for the test


def to_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Blip2 names -> LAVIS names (written independently of expblip's forward mapping)."""
    out = {}
    for key, value in state.items():
        if key == "language_model.lm_head.weight":
            out["opt_model.lm_head.weight"] = value
            continue
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m:
            q, k, v = value.chunk(3)
            assert torch.count_nonzero(k) == 0
            out[f"visual_encoder.blocks.{m[1]}.attn.q_bias"] = q.clone()
            out[f"visual_encoder.blocks.{m[1]}.attn.v_bias"] = v.clone()
            continue
        out[_lavis_key(key)] = value
    return out


def _lavis_key(key: str) -> str:
    fixed = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "query_tokens": "query_tokens",
    }
    if key in fixed:
        return fixed[key]
    pairs = [
        ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
        ("vision_model.post_layernorm.", "ln_vision."),
        ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
        ("language_projection.", "opt_proj."),
        ("language_model.", "opt_model."),
    ]
    for ours, theirs in pairs:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("vision_model.encoder.layers."):
        rest = key[len("vision_model.encoder.layers."):]
        rest = (rest.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
                .replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj."))
        return "visual_encoder.blocks." + rest
    if key.startswith("qformer.encoder.layer."):
        rest = key[len("qformer.encoder.layer."):]
        rest = rest.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                                 ".crossattention.self.")
        return "Qformer.bert.encoder.layer." + rest
    raise AssertionError(f"the test's inverse mapping does not know {key}")


STAGE1 = {  # LAVIS stage-1 extra -> the name expblip reports it under
    "Qformer.bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "Qformer.bert.encoder.layer.0.intermediate.dense.weight": "qformer.encoder.layer.0.intermediate.dense.weight",
    "Qformer.bert.encoder.layer.0.output.dense.weight": "qformer.encoder.layer.0.output.dense.weight",
    "Qformer.bert.encoder.layer.1.output.LayerNorm.bias": "qformer.encoder.layer.1.output.LayerNorm.bias",
    "vision_proj.weight": "vision_projection.weight",
    "vision_proj.bias": "vision_projection.bias",
    "text_proj.weight": "text_projection.weight",
    "itm_head.weight": "itm_head.weight",
    "itm_head.bias": "itm_head.bias",
    "temp": "lavis.temp",
    "Qformer.cls.predictions.bias": "lavis.Qformer.cls.predictions.bias",
    "Qformer.cls.predictions.transform.dense.weight": "lavis.Qformer.cls.predictions.transform.dense.weight",
}


def lavis_checkpoint(model, path: Path, keep=lambda key: True) -> Path:
    state = {k: v for k, v in to_lavis(model.state_dict()).items() if keep(k)}
    state.update({k: torch.randn(4, 4) for k in STAGE1})
    state["temp"] = torch.tensor(0.07)
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(8)[None]  # a buffer: dropped silently
    state["junk.weight"] = torch.zeros(3)
    # what LAVIS' runner saves: weights under "model", beside plain-data training state
    torch.save({"model": state, "epoch": 3, "config": {"run": {"lr": 1e-4}}, "optimizer": {"state": {}}}, path)
    return path


# ---------------------------------------------------------------- LAVIS


def test_lavis_checkpoint_imports_with_an_exact_key_report(tokenizer, tmp_path):
    source, target = tiny(tokenizer, 0), tiny(tokenizer, 1)
    report = load_into_model(target, import_lavis(lavis_checkpoint(source, tmp_path / "blip2.pth")))
    own = list(target.state_dict())
    assert report.missing == [] and report.mismatched_shapes == []
    assert report.unexpected == ["junk.weight"]
    assert sorted(report.extras) == sorted(STAGE1.values())
    assert sorted(report.loaded) == sorted(own)  # lm_head counts once loaded, as it is tied to embed_tokens
    want, got = source.state_dict(), target.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in own)
    summary = report.summary()
    assert f"loaded {len(own)} of the model's {len(own)} tensors" in summary
    assert "unexpected (ignored): 1" in summary and "stage-1 extras (ignored): 13" in summary


def test_trimmed_exp_blip_checkpoint_reports_the_frozen_towers_missing(tokenizer, tmp_path):
    """The released Exp-BLIP checkpoints hold only trained parameters: Q-Former, query tokens, projection."""
    source, target = tiny(tokenizer, 0), tiny(tokenizer, 1)
    trained = ("Qformer.", "query_tokens", "opt_proj.")
    path = lavis_checkpoint(source, tmp_path / "trimmed.pth", keep=lambda k: k.startswith(trained))
    report = load_into_model(CaptionModel(target), import_lavis(path))  # a CaptionModel works too
    towers = [k for k in target.state_dict() if k.startswith(("vision_model.", "language_model."))]
    assert sorted(report.missing) == sorted(towers)
    assert sorted(report.loaded) == sorted(k for k in target.state_dict() if k not in towers)
    assert "missing (kept as initialised): " in report.summary() and "vision_model" in report.summary()
    with pytest.raises(ValueError, match="do not fit the model"):
        load_into_model(target, import_lavis(path), strict=True)


def test_shape_mismatch_is_reported_and_not_loaded(tokenizer):
    model = tiny(tokenizer, 0)
    before = model.query_tokens.detach().clone()
    report = load_into_model(model, {"blip2.query_tokens": torch.ones(1, 3, 64)})  # CaptionModel's prefix
    assert report.mismatched_shapes == [("query_tokens", (1, 3, 64), tuple(before.shape))]
    assert torch.equal(model.query_tokens, before)
    assert "shape mismatch (not loaded): query_tokens is [1, 3, 64]" in report.summary()


def test_lone_q_bias_is_an_error(tmp_path):
    torch.save({"model": {"visual_encoder.blocks.0.attn.q_bias": torch.zeros(4)}}, tmp_path / "half.pth")
    with pytest.raises(ValueError, match="q_bias and v_bias"):
        import_lavis(tmp_path / "half.pth")


@dataclass
class Payload:  # a class that a pickle would construct: refused by weights_only loading
    note: str


def test_pickled_objects_are_refused_unless_allowed(tokenizer, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1, 8, 64)}, "args": Payload("x")}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        import_lavis(path)
    assert list(import_lavis(path, allow_pickle=True)) == ["query_tokens"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    torch.save(Payload("not a state dict"), hf_dir / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        import_hf_dir(hf_dir)


# ---------------------------------------------------------------- HF-format directories


def test_sharded_hf_dir_reads_through_its_index(tokenizer, tmp_path):
    """The layout of the public Salesforce/blip2-* repos, written by transformers itself."""
    model = tiny(tokenizer, 0)
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    state = import_hf_dir(tmp_path / "hf")
    assert sorted(state) == sorted(index["weight_map"])
    target = tiny(tokenizer, 1)
    report = load_into_model(target, state)
    assert report.ok and report.extras == []
    assert same(model.state_dict(), target.state_dict())
    (tmp_path / "hf" / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        import_hf_dir(tmp_path / "hf")


def test_our_writer_shards_and_stock_transformers_reads_it(tokenizer, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    model = tiny(tokenizer, 0)
    out = save_hf_dir({f"blip2.{k}": v for k, v in model.state_dict().items()}, model.config, tokenizer,
                      tmp_path / "ours", max_shard_bytes=300_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    loaded = Blip2ForConditionalGeneration.from_pretrained(str(out), local_files_only=True)
    assert same(model.state_dict(), loaded.state_dict())
    assert json.loads((out / "expblip.json").read_text())["format"] == "full"
    with pytest.raises(ValueError, match="missing 1"):
        save_hf_dir({k: v for k, v in model.state_dict().items() if k != "query_tokens"}, model.config, tokenizer,
                    tmp_path / "broken")


def test_hf_dir_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf_dir(tmp_path)


# ---------------------------------------------------------------- fingerprints


def test_fingerprints_compare_in_the_dtype_the_run_held_the_tower_in():
    weights = torch.randn(16, 8)
    as_trained = {"w": {"sha256": fingerprint(weights.bfloat16()), "dtype": "bfloat16", "shape": [16, 8]}}
    assert check_towers({"w": weights}, as_trained) == []  # fp32 towers, trained in bf16: same after the cast
    exact = {"w": {"sha256": fingerprint(weights), "dtype": "float32", "shape": [16, 8]}}
    assert check_towers({"w": weights.bfloat16()}, exact)[0].startswith("w: different values (towers in bfloat16")
    assert check_towers({"w": weights[:8]}, exact) == ["w: shape [8, 8], expected [16, 8]"]
    assert check_towers({}, exact) == ["w: absent from the towers"]
    assert issubclass(TowerMismatchError, ValueError)
