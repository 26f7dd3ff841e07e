"""The tiny BLIP-2: label masking, image-token count, freezing policy, generation, paper presets' shapes."""

from __future__ import annotations

import pytest
import torch

from expblip.model.blip2 import (
    PRESETS,
    CaptionModel,
    GenerationConfig,
    ModelConfig,
    apply_freezing,
    blip2_config,
    build_model,
    caption_inputs,
    generate_captions,
)
from expblip.model.tokenizer import caption_end_id, image_token_id, train_caption_tokenizer

CAPTIONS = ["It is a people who raises cheek and pulls lip corner.", "It is a people who drops jaw."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_caption_tokenizer([c.lower() for c in CAPTIONS], vocab_size=300)


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return build_model(ModelConfig(dropout=0.0), tok)


def test_labels_mask_queries_prompt_and_padding(tok):
    batch = caption_inputs(tok, ["it is a people who drops jaw.", "it is a people who raises cheek and pulls lip corner."],
                           num_query=8, max_tokens=64)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ((ids == image_token_id(tok)).sum(1) == 8).all()  # exactly num_query image tokens per row
    assert (labels[:, :9] == -100).all()  # 8 queries + the </s> prompt never count
    assert (labels[mask == 0] == -100).all()  # padding never counts
    end = caption_end_id(tok)
    for row_ids, row_labels, row_mask in zip(ids, labels, mask, strict=True):
        last = int(row_mask.sum()) - 1
        assert row_ids[last] == end and row_labels[last] == end  # every caption ends with "\n", and it is learned
        assert tok.decode(row_labels[row_labels != -100]).endswith("\n")


def test_truncated_caption_still_ends_with_end_token(tok):
    batch = caption_inputs(tok, [CAPTIONS[0].lower()], num_query=0, max_tokens=4)
    assert batch["input_ids"].shape[1] == 1 + 4
    assert batch["input_ids"][0, -1] == caption_end_id(tok)


def test_loss_depends_on_the_image(model, tok):
    """Too few image tokens would silently ignore the image; with BLIP-2 masking, pixels change the loss."""
    batch = caption_inputs(tok, CAPTIONS[:2], num_query=model.config.num_query_tokens, max_tokens=32)
    cm = CaptionModel(model).eval()
    a = cm(pixel_values=torch.randn(2, 3, 64, 64), **batch)
    b = cm(pixel_values=torch.randn(2, 3, 64, 64), **batch)
    assert torch.isfinite(a) and not torch.allclose(a, b)


def test_freezing_policy_paper_default_and_lm_stage(model):
    cfg = ModelConfig()
    apply_freezing(model, cfg, "stage2")
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"qformer", "query_tokens", "language_projection"}
    apply_freezing(model, ModelConfig(freeze_vision=False), "stage2")
    assert any(p.requires_grad for p in model.vision_model.parameters())
    apply_freezing(model, cfg, "lm")
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"language_model"}


def test_few_steps_of_training_reduce_the_loss(model, tok):
    apply_freezing(model, ModelConfig(freeze_lm=False), "stage2")
    cm = CaptionModel(model)
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=3e-3)
    batch = caption_inputs(tok, CAPTIONS[:8], num_query=model.config.num_query_tokens, max_tokens=32)
    pixels = torch.randn(8, 3, 64, 64)
    losses = []
    for _ in range(15):
        loss = cm(pixel_values=pixels, **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("gen", [GenerationConfig(num_beams=3, max_new_tokens=8),
                                 GenerationConfig(sample=True, max_new_tokens=8)], ids=["beam", "nucleus"])
def test_generation_decodes_only_the_new_tokens_of_each_image(model, tok, gen):
    from expblip.model.tokenizer import caption_end_id

    pixels = torch.randn(3, 3, 64, 64)
    torch.manual_seed(0)
    captions = generate_captions(model.eval(), tok, pixels, gen)
    torch.manual_seed(0)  # the same draw for nucleus sampling
    kwargs = dict(num_beams=1, do_sample=True, top_p=gen.top_p) if gen.sample else dict(num_beams=gen.num_beams)
    out = model.generate(pixel_values=pixels, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                         eos_token_id=caption_end_id(tok), pad_token_id=tok.pad_token_id, **kwargs)
    prompt = model.config.num_query_tokens + 1  # the image tokens and </s>: never part of a caption
    assert out.shape[1] <= prompt + gen.max_new_tokens
    assert captions == [t.strip() for t in tok.batch_decode(out[:, prompt:], skip_special_tokens=True)]
    assert all(tok.decode(row[:prompt]).count("<image>") == model.config.num_query_tokens for row in out)


# (ViT width, depth), (OPT width, depth): EVA ViT-g/14 1408 x 39 (LAVIS drops its last layer of 40), CLIP ViT-B/16
# 768 x 12; OPT-6.7B 4096 x 32, OPT-2.7B 2560 x 32 (the released configs of Salesforce/blip2-opt-*).
@pytest.mark.parametrize("preset, billions, vit, opt", [("vitg-opt6.7b", (7.5, 8.0), (1408, 39), (4096, 32)),
                                                        ("vitg-opt2.7b", (3.7, 4.1), (1408, 39), (2560, 32)),
                                                        ("vitb-opt2.7b", (2.8, 3.1), (768, 12), (2560, 32))])
def test_paper_presets_build_the_paper_shapes_without_memory(tok, preset, billions, vit, opt):
    """Built on the meta device: the same code path as training, no weights allocated."""
    cfg = ModelConfig(preset=preset, tokenizer="/not/needed/for/shapes")
    with torch.device("meta"):
        model = build_model(cfg, tok)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < n < billions[1], n
    c = blip2_config(cfg, tok)
    assert c.num_query_tokens == 32 and c.text_config.vocab_size == 50272
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers) == vit
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers) == opt
    assert (c.qformer_config.hidden_size, c.qformer_config.num_hidden_layers) == (768, 12)  # BERT-base
    assert c.qformer_config.encoder_hidden_size == vit[0] and PRESETS[preset][3] == 32
