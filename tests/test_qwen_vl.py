"""Qwen2.5-VL (expblip.model.qwen_vl): tiny config, torch patchify vs the HF image processor, the chat-turn label
mask, training, generation with left padding, LoRA, parameter counts and exports that stock transformers reads."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.utils import is_torchvision_available

from expblip.model import qwen_vl as q
from expblip.model.generation import Generated, GenerationConfig

CAPTIONS = ["a smiling face with raised cheeks", "a frowning face with lowered brows",
            "a surprised face with open mouth"]
GREEDY = GenerationConfig(num_beams=1, max_new_tokens=12, min_new_tokens=0)
needs_torchvision = pytest.mark.skipif(
    not is_torchvision_available(),
    reason="transformers 5.24 builds Qwen2_5_VLProcessor (AutoProcessor, the pipeline) only with torchvision")


def uint8_images(n: int, h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


@pytest.fixture(scope="module")
def tokenizer():
    return q.tiny_tokenizer(CAPTIONS, vocab_size=300)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return q.make_processor(tokenizer)


@pytest.fixture(scope="module")
def trained(tokenizer, processor):
    """The tiny model after 40 AdamW steps on three fixed images and their captions; (model, pixels, losses)."""
    torch.manual_seed(0)
    model = q.build_model(tokenizer)
    pixels = uint8_images(3)
    batch = q.caption_inputs(processor, pixels, CAPTIONS, max_tokens=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), pixels, losses


def test_tiny_config_fits_64px_faces_and_vllm_heads(tokenizer):
    config = q.tiny_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer)
    assert text.hidden_size // text.num_attention_heads == 32  # vLLM's CPU attention takes head sizes >= 32
    assert 2 * sum(text.rope_parameters["mrope_section"]) == 32
    assert vision.out_hidden_size == text.hidden_size and vision.depth == 2
    assert max(vision.fullatt_block_indexes) < vision.depth
    assert (q.TINY_IMAGE // vision.patch_size) ** 2 // vision.spatial_merge_size**2 == 16  # image tokens per face
    ids = q.token_ids(tokenizer)
    assert config.image_token_id == ids["image"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert text.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.image_token == "<|image_pad|>"


@pytest.mark.parametrize("h,w", [(64, 64), (48, 80)])
def test_patchify_equals_the_hf_image_processor(processor, h, w):
    pixels = uint8_images(3, h, w)
    ours = q.pixel_inputs(processor, pixels)
    theirs = processor.image_processor(images=to_pil(pixels), return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (3 * (h // 8) * (w // 8), 3 * 2 * 8 * 8)
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)


def test_patchify_refuses_sizes_the_merger_cannot_split(processor):
    with pytest.raises(ValueError, match=r"60x64 px .* multiples of 16; resize them to e\.g\. 64x64"):
        q.patchify(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="resizes 128x128 px images to 64x64"):  # past max_pixels: not what it sees
        q.pixel_inputs(processor, uint8_images(1, 128, 128))


def test_prompt_follows_qwen25_vl_chat_layout(processor):
    text = q.prompt_text(processor, "Name the emotion.", 16)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + "<|image_pad|>" * 16 + "<|vision_end|>Name the emotion.<|im_end|>\n<|im_start|>assistant\n")
    assert q.prompt_text(processor, "", 1).endswith("<|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def test_labels_cover_the_answer_and_im_end_only(processor, tokenizer):
    prompts = ["", "Name the emotion.", ""]
    batch = q.caption_inputs(processor, uint8_images(3), CAPTIONS, prompts, max_tokens=4)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    end, image = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"], (ids == image).int())
    assert ((ids == image).sum(1) == 16).all()
    for i, prompt in enumerate(prompts):
        head = q.prompt_ids(processor, prompt, 16)
        answer = tokenizer(CAPTIONS[i], add_special_tokens=False)["input_ids"][:3] + [end]  # truncated, still ended
        n = len(head) + len(answer)
        assert ids[i, :n].tolist() == head + answer and mask[i, :n].all() and not mask[i, n:].any()
        assert (labels[i, : len(head)] == -100).all() and (labels[i, n:] == -100).all()  # turns, pads, padding
        assert labels[i, len(head) : n].tolist() == answer  # not shifted: the loss shifts
    assert batch["pixel_values"].shape == (3 * 64, 384) and batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3


def test_training_lowers_the_loss_and_learns_the_captions(trained, processor):
    model, pixels, losses = trained
    assert losses[-1] < 0.25 * losses[0]
    inputs = q.pixel_inputs(processor, pixels)
    out = q.generate_captions(model, processor, inputs["pixel_values"], inputs["image_grid_thw"], GREEDY,
                              with_lengths=True)
    assert [g.text for g in out] == CAPTIONS
    assert all(isinstance(g, Generated) and g.stopped for g in out)


def test_mm_token_type_ids_give_image_tokens_grid_positions(trained, processor):
    """transformers 5 computes Qwen2.5-VL's 3-D rotary positions only when mm_token_type_ids is passed."""
    model, pixels, _ = trained
    batch = q.caption_inputs(processor, pixels[:1], CAPTIONS[:1], max_tokens=16)
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    image = batch["mm_token_type_ids"][0].bool()
    start = int(image.nonzero()[0])  # the first <|image_pad|>: 1-D text positions up to here
    t, h, w = positions[:, 0, image]
    assert (t == start).all()
    rows, cols = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)  # the merged 4 x 4 grid, row-major
    assert torch.equal(h, start + rows) and torch.equal(w, start + cols)
    assert positions[:, 0, start + 16].tolist() == [start + 4] * 3  # <|vision_end|>: after the 4 x 4 merged grid
    with torch.no_grad():
        without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        assert not torch.isclose(model(**batch).loss, model(**without).loss)


def test_generation_left_pads_images_of_different_sizes(trained, processor):
    """A batch of 64x64, 48x80 and 70x50 (resized by the processor to 64x48) images captions each as if alone."""
    model, pixels, _ = trained
    images = [to_pil(pixels[:1])[0], to_pil(uint8_images(1, 48, 80, seed=5))[0], to_pil(uint8_images(1, 70, 50))[0]]
    pixel_values, grid = q.preprocess(processor, images)
    assert grid.tolist() == [[1, 8, 8], [1, 6, 10], [1, 8, 6]]
    together = q.generate_captions(model, processor, pixel_values, grid, GREEDY, prompt="Name the emotion.")
    alone = [q.generate_captions(model, processor, *q.preprocess(processor, [im]), GREEDY,
                                 prompt="Name the emotion.")[0] for im in images]
    assert together == alone
    beams = q.generate_captions(model, processor, pixel_values, grid, GenerationConfig(num_beams=3, max_new_tokens=12))
    assert len(beams) == 3 and beams[0] == CAPTIONS[0]


def test_lora_trains_adapters_only_and_merges_into_a_plain_model(tokenizer, processor):
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in q.build_model(tokenizer).named_modules()]
    lm_only = [n for n in names if re.fullmatch(q.lora_targets(vision=False), n)]
    assert len(lm_only) == 2 * 7 and not any(n.startswith("model.visual") for n in lm_only)
    torch.manual_seed(0)
    model = get_peft_model(q.build_model(tokenizer), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=q.lora_targets(vision=True)))
    adapted = {n.split(".lora_A.")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
               if ".lora_A." in n}
    assert adapted == set(lm_only) | {n for n in names if re.fullmatch(q.lora_targets(vision=True), n)}
    assert len(adapted) == 2 * 7 + 2 * 5 and not any(".merger." in n for n in adapted)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = q.caption_inputs(processor, uint8_images(3), CAPTIONS, max_tokens=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)  # B starts at zero: the adapters now change the model
    with pytest.raises(ValueError, match="merge them first"):
        q.save_export(model.base_model.model, processor, "/nonexistent")
    with torch.no_grad():
        expected = model(**batch).logits
    merged = model.merge_and_unload()
    assert type(merged) is Qwen2_5_VLForConditionalGeneration
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_plan_counts_equal_the_built_models(tokenizer):
    model = q.build_model(tokenizer)
    built = Counter()
    for name, p in model.named_parameters():
        built[q.tower_of(name)] += p.numel()
    counts = q.plan_counts(q.preset_dims(q.TINY_PRESET, len(tokenizer)))
    assert {k: counts[k] for k in built} == dict(built) and counts["total"] == sum(built.values())
    # published shapes, built on the meta device (no memory); totals as the hub reports the released checkpoints
    for preset, total in (("qwen2.5-vl-3b", 3_754_622_976), ("qwen2.5-vl-7b", 8_292_166_656)):
        with torch.device("meta"):
            big = q.build_model(q.published_config(preset), init=False)
        per_tower = Counter()
        for name, p in big.named_parameters():
            per_tower[q.tower_of(name)] += p.numel()
        assert q.plan_counts(q.PAPER_DIMS[preset]) == dict(per_tower, total=total)


def test_build_without_init_ties_the_head(tokenizer):
    model = q.build_model(tokenizer, init=False, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"


def test_export_reads_back_with_stock_transformers(trained, processor, tmp_path):
    """AutoModelForImageTextToText + AutoTokenizer + AutoImageProcessor + the exported chat template, used as
    Qwen2_5_VLProcessor uses them (no expblip code on the reading side), give our greedy captions."""
    model, pixels, _ = trained
    out = q.save_export(model, processor, tmp_path / "export", gen=GREEDY)
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    stock = AutoModelForImageTextToText.from_pretrained(out).eval()
    tok, image_processor = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    images = image_processor(images=to_pil(pixels), return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    text = tok.apply_chat_template(messages, chat_template=(out / "chat_template.jinja").read_text(), tokenize=False,
                                   add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * 16)
    ids = tok([text] * 3, return_tensors="pt", add_special_tokens=False)
    generated = stock.generate(**ids, **images, mm_token_type_ids=(ids["input_ids"] == tok.image_token_id).int())
    theirs = [t.strip() for t in tok.batch_decode(generated[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)]
    ours = q.generate_captions(model, processor, **q.pixel_inputs(processor, pixels), gen=GREEDY)
    assert theirs == ours == CAPTIONS
    reread = q.load_processor(out)
    assert q.prompt_ids(reread, "", 16) == q.prompt_ids(processor, "", 16)


@needs_torchvision
def test_export_captions_equal_through_auto_processor_and_pipeline(trained, processor, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLProcessor, pipeline

    model, pixels, _ = trained
    out = q.save_export(model, processor, tmp_path / "export", gen=GREEDY)
    ours = q.generate_captions(model, processor, **q.pixel_inputs(processor, pixels), gen=GREEDY)
    auto = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert isinstance(auto, Qwen2_5_VLProcessor)
    messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": ""}]}]
                for im in to_pil(pixels)]
    inputs = auto.apply_chat_template(messages[0], tokenize=True, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == q.prompt_ids(processor, "", 16)
    stock = AutoModelForImageTextToText.from_pretrained(out).eval()
    first = stock.generate(**inputs)
    assert auto.decode(first[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == ours[0]
    pipe = pipeline("image-text-to-text", model=str(out))
    results = pipe(text=messages, return_full_text=False)
    assert [r[0]["generated_text"].strip() for r in results] == ours == CAPTIONS


def test_load_processor_needs_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="local copy"):
        q.load_processor(tmp_path / "missing")
