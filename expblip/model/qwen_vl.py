"""Qwen2.5-VL on transformers' own classes: presets, an offline tiny tokenizer and processor, caption inputs with
chat-turn label masking, generation, LoRA targets, parameter counts and HF exports that stock transformers loads.

Data flow (B images of H x W px, patch p, merge m, temporal patch t = 2; D = the LM's hidden size):
    uint8 [B,3,H,W] -> normalise (CLIP mean/std) -> patchify -> pixel_values [B*(H/p)*(W/p), 3*t*p*p]
                                                               image_grid_thw [B,3] = (1, H/p, W/p) per image
    ViT (window + full attention over the patches) -> merger (m x m patches -> 1) -> [B*N, D], N = HW / (p*m)^2
    LM input of one sample, in the layout of Qwen2.5-VL's chat template (the processor's chat_template):
        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
        <|vision_start|> <|image_pad|>*N <|vision_end|> prompt <|im_end|>\\n<|im_start|>assistant\\n caption <|im_end|>
    labels: -100 everywhere except the caption tokens and the closing <|im_end|> (the loss shifts them itself);
    mm_token_type_ids: 1 on <|image_pad|>, else 0. transformers 5 computes Qwen2.5-VL's 3-D (t, h, w) rotary
    positions only when mm_token_type_ids is passed: without it every token gets 1-D text positions.

The tiny preset is a CPU debug model for the synthetic world's 64 x 64 faces: patch 8, merge 2 -> 16 image tokens;
the 3B and 7B presets have the published shapes (PAPER_DIMS) and processors (patch 14). A Qwen2_5_VLProcessor
holds a video processor, which transformers 5 builds only with torchvision installed; without it, make_processor and
load_processor return a ProcessorParts (tokenizer, image processor, chat template) that every function here takes
alike and whose save_pretrained writes the same loadable layout. Nothing here imports Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers import GenerationConfig as HFGenerationConfig
from transformers.utils import is_torchvision_available

from expblip.model.au_head import au_targets, masked_bce
from expblip.model.family import QWEN2
from expblip.model.generation import Generated, GenerationConfig, decode_new
from expblip.model.hf import from_config
from expblip.model.tokenizer import train_caption_tokenizer
from expblip.pixels import CLIP_MEAN, CLIP_STD, normalise

QWEN_VL_PRESETS = ("tiny-qwen2.5-vl", "qwen2.5-vl-3b", "qwen2.5-vl-7b")
TINY_PRESET = QWEN_VL_PRESETS[0]

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
CAPTION_END = QWEN2.caption_end  # <|im_end|>: ends the assistant turn, the caption and generation
IGNORE = -100  # the label of a position the loss skips

TINY_IMAGE = 64  # the synthetic world's faces, px
TINY_PATCH = 8
PUBLISHED_PATCH = 14
MERGE = 2  # spatial merge: m x m patches become one LM token
TEMPORAL = 2  # a still image is repeated over the temporal patch

# Qwen2.5-VL's published chat template (chat_template.json of Qwen/Qwen2.5-VL-*-Instruct): a default system turn,
# the image as <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|> per image token)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Token ids of the published Qwen2.5 vocabulary (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct; it
# names no pad id: its tokenizer pads with <|endoftext|> = bos)
PUBLISHED_TOKEN_IDS = {"bos": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655,
                       "video": 151656}
_MROPE_SECTION = (16, 24, 24)  # published, for head dim 128: t, h, w frequency pairs summing to head_dim / 2
_VISION_PUBLISHED = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
# Shapes of the published models, from the config.json files of Qwen/Qwen2.5-VL-3B-Instruct and
# Qwen/Qwen2.5-VL-7B-Instruct on the Hugging Face hub (LM: Qwen2.5-3B / -7B; vision: the same 32-block ViT, 1280 wide)
PAPER_DIMS: dict[str, dict] = {
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6,
                          mrope_section=_MROPE_SECTION, vision=dict(_VISION_PUBLISHED, out_hidden_size=2048)),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                          max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6,
                          mrope_section=_MROPE_SECTION, vision=dict(_VISION_PUBLISHED, out_hidden_size=3584)),
}
# Parameter-name prefixes of the towers (plan_counts' keys); the LM also owns lm_head (tied to its embedding or not)
TOWERS = {"merger": "model.visual.merger.", "vision": "model.visual.", "lm": ""}


# ------------------------------------------------------------------------------------------------ shapes and configs


def tiny_dims(vocab_size: int) -> dict:
    """The tiny preset's shapes: ViT 2 blocks x 64 wide (heads of 32), patch 8, merge 2, block 0 in windows of
    32 px (2 x 2 merged tokens: a 64 px image has 4 windows), block 1 full; LM 2 layers x 64 wide, 2 heads of 32
    (vLLM's CPU attention takes head sizes >= 32), 1 key/value head, mrope sections (4, 6, 6) = head_dim / 2."""
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=512,
                rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(4, 6, 6),
                vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=TINY_PATCH,
                            spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=32,
                            fullatt_block_indexes=(1,), tokens_per_second=2, out_hidden_size=64))


def preset_dims(preset: str, vocab_size: int | None = None) -> dict:
    """A preset's shapes as plain numbers (memory planning, plan_counts); the tiny preset needs its vocab_size."""
    if preset == TINY_PRESET:
        if vocab_size is None:
            raise ValueError(f"{TINY_PRESET}'s vocabulary is its trained tokenizer's: pass vocab_size=len(tokenizer)")
        return tiny_dims(vocab_size)
    if preset not in PAPER_DIMS:
        raise ValueError(f"Qwen2.5-VL preset {preset!r} does not exist; choose one of {list(QWEN_VL_PRESETS)}")
    dims = dict(PAPER_DIMS[preset])
    return dims if vocab_size is None else dict(dims, vocab_size=vocab_size)


def config_from_dims(dims: dict, ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig of `dims` (tiny_dims / PAPER_DIMS) with the special-token ids `ids` (keys as
    PUBLISHED_TOKEN_IDS, "pad" optional). The text rotary embedding is mrope: sections of (t, h, w) frequency
    pairs; the ViT's first blocks attend within windows of window_size px, fullatt_block_indexes over the image."""
    lm = {k: v for k, v in dims.items() if k not in ("vision", "mrope_section", "rope_theta", "tie_word_embeddings")}
    rope = {"rope_type": "default", "rope_theta": dims["rope_theta"], "mrope_section": list(dims["mrope_section"])}
    special = dict(pad_token_id=ids.get("pad"), bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    vision = dict(dims["vision"], fullatt_block_indexes=list(dims["vision"]["fullatt_block_indexes"]))
    return Qwen2_5_VLConfig(text_config=dict(lm, rope_parameters=rope, **special), vision_config=vision,
                            image_token_id=ids["image"], video_token_id=ids["video"],
                            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                            tie_word_embeddings=dims["tie_word_embeddings"], **special)


def tiny_config(tokenizer) -> Qwen2_5_VLConfig:
    """The tiny random model's config, with the vocabulary and special ids of `tokenizer` (tiny_tokenizer)."""
    return config_from_dims(tiny_dims(len(tokenizer)), token_ids(tokenizer))


def published_config(preset: str) -> Qwen2_5_VLConfig:
    """The config of a published preset (qwen2.5-vl-3b / -7b): shapes and token ids as released."""
    return config_from_dims(preset_dims(preset), PUBLISHED_TOKEN_IDS)


def plan_counts(dims: dict) -> dict[str, int]:
    """Parameters per tower from shapes alone: vision (patch embedding + blocks), merger, lm (embedding, layers,
    final norm and an untied lm_head), and their total. Equals the built model's parameter count per tower."""
    vision = dims["vision"]
    counts = {"vision": _vision_params(vision), "merger": _merger_params(vision), "lm": _lm_params(dims)}
    return dict(counts, total=sum(counts.values()))


def _vision_params(v: dict) -> int:
    d, inner = v["hidden_size"], v["intermediate_size"]
    embed = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * d  # Conv3d without bias
    attn = (d * 3 * d + 3 * d) + (d * d + d)  # fused qkv, output projection (both with bias)
    mlp = 3 * d * inner + 2 * inner + d  # gate / up / down with bias
    return embed + v["depth"] * (attn + mlp + 2 * d)  # + two RMSNorms per block


def _merger_params(v: dict) -> int:
    d, wide = v["hidden_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    return d + (wide * wide + wide) + (wide * v["out_hidden_size"] + v["out_hidden_size"])  # RMSNorm + 2 linears


def _lm_params(t: dict) -> int:
    d, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    head_dim = d // heads
    attn = (d * heads * head_dim + heads * head_dim) + 2 * (d * kv * head_dim + kv * head_dim) + heads * head_dim * d
    layer = attn + 3 * d * t["intermediate_size"] + 2 * d
    embed = t["vocab_size"] * d
    return embed + t["num_hidden_layers"] * layer + d + (0 if t["tie_word_embeddings"] else embed)


def tower_of(name: str) -> str:
    """The tower (plan_counts' key) of a parameter name of Qwen2_5_VLForConditionalGeneration."""
    return next(tower for tower, prefix in TOWERS.items() if name.startswith(prefix))


# --------------------------------------------------------------------------------------- tokenizer and processor


def tiny_tokenizer(captions: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `captions` in Qwen2.5's conventions (expblip.model.family.QWEN2: <|endoftext|>
    pad, <|im_start|>, <|im_end|> = caption end) plus Qwen2.5-VL's vision tokens, <|image_pad|> as image_token.
    Offline and deterministic; ids: the family's specials 0..3, the trained merges, then the 4 vision tokens."""
    from tokenizers import AddedToken

    backend = train_caption_tokenizer(captions, vocab_size, QWEN2).backend_tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=CAPTION_END, pad_token=QWEN2.pad, padding_side="left",
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD})


def token_ids(tokenizer) -> dict[str, int]:
    """The special ids a Qwen2.5-VL config names (keys as PUBLISHED_TOKEN_IDS), read from `tokenizer`."""
    ids = dict(zip(("pad", "eos", "vision_start", "vision_end", "image", "video"),
                   tokenizer.convert_tokens_to_ids([QWEN2.pad, CAPTION_END, *VISION_TOKENS]), strict=True))
    missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks Qwen2.5-VL's special tokens {missing}; use tiny_tokenizer or the "
                         "published Qwen2.5-VL tokenizer")
    return dict(ids, bos=ids["pad"])  # Qwen2.5 adds no BOS; its configs name <|endoftext|>


@dataclass(frozen=True)
class ProcessorParts:
    """What a Qwen2_5_VLProcessor holds for images, where transformers cannot build one (no torchvision: its video
    processor needs it). Every function of this module takes it alike; save_pretrained writes the published
    layout (tokenizer files, preprocessor_config.json, chat_template.jinja) that AutoProcessor loads."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: object  # Qwen2VLImageProcessorPil
    chat_template: str

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Tokenizer files, preprocessor_config.json and chat_template.jinja into `out_dir`."""
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        (Path(out_dir) / "chat_template.jinja").write_text(self.chat_template)


def make_processor(tokenizer, min_pixels: int = 32 * 32, max_pixels: int = TINY_IMAGE * TINY_IMAGE,
                   patch_size: int = TINY_PATCH) -> Qwen2_5_VLProcessor | ProcessorParts:
    """Qwen2.5-VL's processor for `tokenizer`: a Qwen2VL image processor (patch `patch_size`: 8 tiny, 14 published;
    merge 2; CLIP mean/std; images resized to multiples of patch*merge px within [min_pixels, max_pixels]) and the
    published chat template. A ProcessorParts where transformers lacks torchvision (see ProcessorParts)."""
    sizes = dict(patch_size=patch_size, merge_size=MERGE, temporal_patch_size=TEMPORAL, image_mean=list(CLIP_MEAN),
                 image_std=list(CLIP_STD))
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if not is_torchvision_available():
        from transformers import Qwen2VLImageProcessorPil

        return ProcessorParts(tokenizer, Qwen2VLImageProcessorPil(size=size, **sizes), CHAT_TEMPLATE)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, **sizes), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)


def load_processor(path: str | Path) -> Qwen2_5_VLProcessor | ProcessorParts:
    """The processor of a local HF directory (a published Qwen2.5-VL copy or save_export's), never from a hub; a
    ProcessorParts of its tokenizer, image processor and chat template where transformers lacks torchvision."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"processor directory {path} does not exist; give a local copy of a Qwen2.5-VL model "
                                "(e.g. Qwen/Qwen2.5-VL-3B-Instruct) or an expblip export")
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    return ProcessorParts(tokenizer, image_processor, _read_chat_template(path, tokenizer))


def _read_chat_template(path: Path, tokenizer) -> str:
    """chat_template.jinja (transformers 5), chat_template.json (the published repos) or the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{path} holds no chat template (chat_template.jinja or chat_template.json)")


# ---------------------------------------------------------------------------------------------------- image inputs


def patchify(normalised: torch.Tensor, patch_size: int = TINY_PATCH, merge_size: int = MERGE,
             temporal_patch_size: int = TEMPORAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [B,3,H,W] -> (pixel_values [B*(H/p)*(W/p), 3*t*p*p], image_grid_thw [B,3] long), in the
    Qwen2VL image processor's layout: per image, patches in m x m groups (the merger's), each flattened as
    (channel, temporal copy, row, column). On the images' device; H and W must be multiples of p * m."""
    b, c, h, w = normalised.shape
    _check_divisible(h, w, patch_size, merge_size)
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = normalised.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B,h,w,m,m,C,p,p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)  # a still image: t copies
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=normalised.device)
    return x.reshape(b * gh * gw, c * temporal_patch_size * p * p), grid


def pixel_inputs(processor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 images [B,3,H,W] (any device) -> pixel_values and image_grid_thw as the processor gives for the same
    images, computed in torch where the pixels are. H x W must be what the processor would keep (a multiple of
    patch * merge px within its min/max pixels): a ValueError says so otherwise."""
    ip = processor.image_processor
    _check_kept_size(ip, *pixels.shape[-2:])
    flat, grid = patchify(normalise(pixels, mean=ip.image_mean, std=ip.image_std), ip.patch_size, ip.merge_size,
                          ip.temporal_patch_size)
    return {"pixel_values": flat, "image_grid_thw": grid}


def _check_divisible(h: int, w: int, patch_size: int, merge_size: int) -> None:
    """Raise unless h x w px split into patch_size-px patches in merge_size x merge_size groups."""
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"images of {h}x{w} px do not split into {patch_size}-px patches merged {merge_size}x"
                         f"{merge_size}: height and width must be multiples of {unit}; resize them to e.g. "
                         f"{max(unit, round(h / unit) * unit)}x{max(unit, round(w / unit) * unit)} px first")


def _check_kept_size(image_processor, h: int, w: int) -> None:
    """Raise unless the image processor would leave an h x w image at its size (so torch and processor agree)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    unit = image_processor.patch_size * image_processor.merge_size
    _check_divisible(h, w, image_processor.patch_size, image_processor.merge_size)
    size = image_processor.size
    low, high = size["shortest_edge"], size["longest_edge"]
    kept = smart_resize(h, w, factor=unit, min_pixels=low, max_pixels=high)
    if kept != (h, w):
        raise ValueError(f"the processor resizes {h}x{w} px images to {kept[0]}x{kept[1]} (min_pixels {low}, "
                         f"max_pixels {high}); resize the images to {kept[0]}x{kept[1]} or widen the processor's "
                         "min/max pixels so that training sees what inference sees")


def preprocess(processor, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images of any sizes -> (pixel_values [sum of patches, 3*t*p*p], image_grid_thw [B,3]) through the HF image
    processor itself: each image resized to a multiple of patch * merge px within its min/max pixels."""
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def image_token_counts(image_grid_thw: torch.Tensor, merge_size: int = MERGE) -> list[int]:
    """LM tokens per image: t * h * w / merge^2 of each row of image_grid_thw [B,3]."""
    return (image_grid_thw.prod(-1) // merge_size**2).tolist()


# ----------------------------------------------------------------------------------------------------- text inputs


def prompt_text(processor, prompt: str, image_tokens: int) -> str:
    """The text an image and an instruction make before the answer: the processor's chat template, rendered for one
    user turn (image, then `prompt`; '' for none) with the assistant turn opened, <|image_pad|> repeated per token."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
    if text.count(IMAGE_PAD) != 1:
        raise ValueError(f"the chat template renders {text.count(IMAGE_PAD)} {IMAGE_PAD} for one image; expected 1")
    return text.replace(IMAGE_PAD, IMAGE_PAD * image_tokens)


def prompt_ids(processor, prompt: str, image_tokens: int) -> list[int]:
    """Token ids of prompt_text (the tokens the model reads before it answers)."""
    return processor.tokenizer(prompt_text(processor, prompt, image_tokens), add_special_tokens=False)["input_ids"]


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """mm_token_type_ids [B,L] int: 1 on image tokens, 2 on video tokens, 0 elsewhere (the processor's)."""
    types = (input_ids == image_token_id).int()
    return types if video_token_id is None else types + 2 * (input_ids == video_token_id).int()


def text_inputs(processor, image_tokens: Sequence[int], captions: Sequence[str], prompts: Sequence[str] | None,
                max_tokens: int) -> dict[str, torch.Tensor]:
    """Token inputs of captioning: each sample's chat prompt (image_tokens[i] image pads, prompts[i]) then its
    caption (at most max_tokens - 1 tokens) and <|im_end|>, right-padded. Returns input_ids, attention_mask,
    labels (-100 but on caption tokens and <|im_end|>; not shifted: the model's loss shifts) and mm_token_type_ids,
    each [B, L] on the CPU."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(CAPTION_END)
    prompts = list(prompts) if prompts is not None else [""] * len(captions)
    heads_by_key: dict[tuple[str, int], list[int]] = {}
    heads = [heads_by_key.setdefault((p or "", n), prompt_ids(processor, p or "", n))
             for p, n in zip(prompts, image_tokens, strict=True)]
    bodies = tok([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
    answers = [ids[: max_tokens - 1] + [end] for ids in bodies]
    width = max(len(h) + len(a) for h, a in zip(heads, answers, strict=True))
    input_ids = torch.full((len(answers), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    attention = torch.zeros_like(input_ids)
    for i, (head, answer) in enumerate(zip(heads, answers, strict=True)):
        n = len(head) + len(answer)
        input_ids[i, :n] = torch.tensor(head + answer)
        labels[i, len(head) : n] = torch.tensor(answer)
        attention[i, :n] = 1
    types = mm_token_types(input_ids, tok.convert_tokens_to_ids(IMAGE_PAD))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mm_token_type_ids": types}


def caption_inputs(processor, pixels: torch.Tensor, captions: Sequence[str], prompts: Sequence[str] | None = None,
                   max_tokens: int = 32) -> dict[str, torch.Tensor]:
    """Everything a training forward takes for uint8 images [B,3,H,W] and their captions: text_inputs (input_ids,
    attention_mask, labels, mm_token_type_ids [B,L]) and pixel_inputs (pixel_values [B*P, 3*t*p*p],
    image_grid_thw [B,3]), all on the pixels' device. `model(**caption_inputs(...)).loss` is the caption loss."""
    images = pixel_inputs(processor, pixels)
    counts = image_token_counts(images["image_grid_thw"], processor.image_processor.merge_size)
    text = text_inputs(processor, counts, captions, prompts, max_tokens)
    return {**{k: v.to(pixels.device) for k, v in text.items()}, **images}


# ------------------------------------------------------------------------------------------------------ generation


def generation_inputs(processor, image_grid_thw: torch.Tensor, prompt: str = "") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and mm_token_type_ids [B, L] of the prompt for each image (its own number of
    image tokens), left-padded so that every row ends where generation starts. On image_grid_thw's device."""
    tok = processor.tokenizer
    rows = [prompt_ids(processor, prompt, n)
            for n in image_token_counts(image_grid_thw, processor.image_processor.merge_size)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
    types = mm_token_types(input_ids, tok.convert_tokens_to_ids(IMAGE_PAD))
    out = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": types}
    return {k: v.to(image_grid_thw.device) for k, v in out.items()}


@torch.no_grad()
def generate_captions(model: Qwen2_5_VLForConditionalGeneration, processor, pixel_values: torch.Tensor,
                      image_grid_thw: torch.Tensor, gen: GenerationConfig | None = None, prompt: str = "",
                      with_lengths: bool = False, **extra) -> list[str] | list[Generated]:
    """Captions of a batch (pixel_values [P, 3*t*p*p] and image_grid_thw [B,3] from pixel_inputs or preprocess),
    the same `prompt` for every image ('' = describe), decoded per `gen` (beam search or sampling) up to <|im_end|>.
    ``with_lengths``: Generated tuples instead of strings."""
    gen = gen or GenerationConfig()
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(CAPTION_END)
    inputs = generation_inputs(processor, image_grid_thw.to(pixel_values.device), prompt)
    out = model.generate(**inputs, pixel_values=pixel_values, image_grid_thw=image_grid_thw.to(pixel_values.device),
                         **gen.hf_kwargs(end, tok.pad_token_id), **extra)
    return decode_new(tok, out[:, inputs["input_ids"].shape[1] :], end, with_lengths)  # the prompt comes first


# --------------------------------------------------------------------------------------------------------- packing


def pack_inputs(model: Qwen2_5_VLForConditionalGeneration, text: dict, image_sizes: Sequence[tuple[int, int]],
                max_tokens: int) -> dict:
    """A right-padded caption batch's text inputs (text_inputs: host tensors) as packed rows, for the images of
    `image_sizes` (H, W): samples laid end to end, in order, a new row when the next would pass `max_tokens` (a
    longer sample has a row of its own), the rows right-padded to the longest. Each sample keeps its own positions:
    position_ids [4, R, L] = the text positions (0.. per sample: transformers 5 builds the causal mask within each
    sample from them, with attention_mask None) and its mRoPE (t, h, w) positions as the unpacked batch's
    (get_rope_index, on the host: a pure function of the config and the ids). Labels start every sample at -100 (its
    prompt), so no token is scored on another sample's. The images stay in sample order, as their tokens do. The
    loss (mean over answer tokens) and its gradients are the unpacked batch's. Returns input_ids, labels,
    mm_token_type_ids [R, L] and position_ids, on the host."""
    ids, mask, labels, types = (text[k] for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"))
    patch = model.config.vision_config.patch_size
    grid = torch.tensor([[1, h // patch, w // patch] for h, w in image_sizes], dtype=torch.long)
    mrope, _ = model.model.get_rope_index(ids, types, grid, attention_mask=mask)
    lengths = mask.sum(-1).tolist()
    rows = _pack_rows(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    out_ids = torch.full((len(rows), width), _pad_id(ids, mask), dtype=ids.dtype)
    out_labels, out_types = torch.full_like(out_ids, IGNORE), torch.zeros_like(out_ids, dtype=types.dtype)
    positions = torch.zeros(4, len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            out_ids[r, at : at + n], out_labels[r, at : at + n] = ids[i, :n], labels[i, :n]
            out_types[r, at : at + n] = types[i, :n]
            positions[0, r, at : at + n] = torch.arange(n)
            positions[1:, r, at : at + n] = mrope[:, i, :n]
            at += n
        positions[0, r, at:] = torch.arange(width - at)  # the padding: a segment of its own, never scored
    return {"input_ids": out_ids, "labels": out_labels, "mm_token_type_ids": out_types, "position_ids": positions}


def _pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Sample indices per row, in order: next-fit up to max_tokens tokens a row."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _pad_id(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The batch's padding token (what fills the unmasked tail of a row), else 0."""
    padded = ids[mask == 0]
    return int(padded[0]) if len(padded) else 0


# ---------------------------------------------------------------------------------------------------- build, LoRA


def build_model(tokenizer_or_config, init: bool = True,
                dtype: torch.dtype | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from a Qwen2_5_VLConfig, or the tiny model for a tokenizer (tiny_config); random-initialised, or
    (init=False) with parameters allocated but never written (transformers' no_init_weights: a 7B model costs no
    random draws) that the caller loads. SDPA attention in both towers; the tied lm_head is tied here either way."""
    config = tokenizer_or_config if isinstance(tokenizer_or_config, Qwen2_5_VLConfig) else tiny_config(
        tokenizer_or_config)
    return from_config(Qwen2_5_VLForConditionalGeneration, config, init, dtype)


_LM_LORA = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_VISION_LORA = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)"


def lora_targets(vision: bool = False) -> str:
    """peft's target_modules for LoRA on the LM's attention and MLP projections (QWEN2.lora_targets), and with
    `vision` the ViT blocks' fused qkv, attention output and MLP too; the merger and lm_head are left out. A regex
    over full module names (peft matches a string target in full): the ViT's MLP reuses the LM's names
    gate_proj / up_proj / down_proj, so suffixes alone would also adapt the ViT."""
    return f"({_LM_LORA}|{_VISION_LORA})" if vision else _LM_LORA


# ---------------------------------------------------------------------------------------------------------- export


def save_export(model: Qwen2_5_VLForConditionalGeneration, processor, out_dir: str | Path,
                gen: GenerationConfig | None = None) -> Path:
    """An HF directory stock transformers reads (AutoModelForImageTextToText, AutoProcessor, the image-text-to-text
    pipeline): model.safetensors + config.json, the processor (tokenizer, image processor, chat template) and
    generation_config.json decoding per `gen` (default: GenerationConfig()) up to <|im_end|>. LoRA adapters must be
    merged first (peft's merge_and_unload): an export holds plain weights."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("the model holds LoRA adapters; merge them first (model = model.merge_and_unload())")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok = processor.tokenizer
    decoding = (gen or GenerationConfig()).hf_kwargs(tok.convert_tokens_to_ids(CAPTION_END), tok.pad_token_id)
    HFGenerationConfig(**decoding).save_pretrained(out)
    return out


# ------------------------------------------------------------------ Qwen2.5-VL as a model family (expblip.model.spec)
# The loop's "tokenizer" of this family is its processor (tokenizer, image processor and chat template): the chat
# template decides the prompt. Training feeds square images of the preset's size, or with model.min_pixels /
# max_pixels each image at its own dynamic resolution (the processor's rule, expblip.pixels.dynamic_shape), patchified
# on the device; the export's processor carries the same bounds, so stock transformers resizes as training did.

PRESET_IMAGE_SIZE = {TINY_PRESET: TINY_IMAGE, "qwen2.5-vl-3b": 448, "qwen2.5-vl-7b": 448}  # 448 px: 256 tokens


class CaptionUnit(nn.Module):
    """The training unit: Qwen2.5-VL's captioning loss (the answer tokens and <|im_end|>; expblip.model.spec)."""

    HF_ATTR = "vlm"  # where the HF model is, and its state-dict prefix (expblip.model.spec.hf_attr)

    def __init__(self, vlm: Qwen2_5_VLForConditionalGeneration):
        super().__init__()
        self.vlm = vlm

    def forward(self, input_ids, labels, pixel_values, image_grid_thw, attention_mask=None, mm_token_type_ids=None,
                position_ids=None) -> torch.Tensor:
        """The caption loss of a padded batch (attention_mask) or of packed rows (position_ids: pack_inputs)."""
        return self.vlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                        image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, position_ids=position_ids,
                        use_cache=False).loss


class VisionUnit(nn.Module):
    """The tiny world's 'vision' stage for a random Qwen2.5-VL, as BLIP-2's (expblip.model.blip2.VisionPretrainModel):
    the ViT and merger learn to see AUs through a linear multi-label head on the image's mean merged token. The head
    is not part of the model and is not exported. Shapes: patches -> merged tokens [B*T, D] -> [B, D] -> [B, A]."""

    HF_ATTR = CaptionUnit.HF_ATTR

    def __init__(self, vlm: Qwen2_5_VLForConditionalGeneration, num_targets: int):
        super().__init__()
        self.vlm = vlm
        self.head = nn.Linear(vlm.config.vision_config.out_hidden_size, num_targets)

    def forward(self, pixel_values, image_grid_thw, targets, target_mask) -> torch.Tensor:
        tokens = self.vlm.model.get_image_features(pixel_values, image_grid_thw).pooler_output  # per image [T, D]
        pooled = torch.stack([t.mean(0) for t in tokens])  # [B, D]
        return masked_bce(self.head(pooled), targets, target_mask)


def spec_training_unit(cfg, processor, _extra=None, init: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """The module the engine wraps for cfg.train.stage: the caption loss (stage2) or the vision stage's AU head."""
    vlm = spec_build(cfg.model, processor, init, dtype)
    return VisionUnit(vlm, len(cfg.train.vision_aus)) if cfg.train.stage == "vision" else CaptionUnit(vlm)


def spec_stage_inputs(cfg, batch: dict, _extra=None) -> dict:
    """The vision stage's AU targets beside the pixels (host tensors)."""
    return au_targets(batch["labels"], cfg.train.vision_aus)


def spec_freeze_stage(model: nn.Module, cfg, stage: str, others_dtype: torch.dtype | None = None) -> None:
    """spec_freeze; the vision stage trains the ViT and merger only."""
    if stage == "vision":
        import dataclasses

        cfg = dataclasses.replace(cfg, freeze_vision=False, freeze_qformer=False, freeze_lm=True)
    spec_freeze(model, cfg, stage, others_dtype)


def image_tokens(config: Qwen2_5_VLConfig) -> int:
    """LM tokens of one training image: (S / patch)^2 / merge^2 for the config's square image size S; with dynamic
    resolution the most an image can have, max_pixels / (patch * merge)^2."""
    bounds = image_bounds(config)
    if bounds:
        return bounds[1] // _unit(config) ** 2
    return tokens_of(config, (image_size(config), image_size(config)))


def tokens_of(config: Qwen2_5_VLConfig, size: tuple[int, int]) -> int:
    """LM tokens of one H x W image (sides multiples of patch x merge): one per merged patch."""
    return (size[0] // _unit(config)) * (size[1] // _unit(config))


def _unit(config: Qwen2_5_VLConfig) -> int:
    """The px an image side is a multiple of: patch x merge."""
    v = config.vision_config
    return v.patch_size * v.spatial_merge_size


def image_size(config: Qwen2_5_VLConfig) -> int:
    """The square size training images have (recorded in config.json as `expblip_image_size`)."""
    return int(getattr(config, "expblip_image_size", TINY_IMAGE))


def image_bounds(config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    """(min_pixels, max_pixels, unit px) of a model trained at dynamic resolution (config.json's
    `expblip_min_pixels` / `expblip_max_pixels`: model.min_pixels / max_pixels); () for square images."""
    high = int(getattr(config, "expblip_max_pixels", 0) or 0)
    if not high:
        return ()
    return int(config.expblip_min_pixels), high, _unit(config)


def pixel_unit(preset: str) -> int:
    """The px an image side of `preset` is a multiple of: patch x merge (tiny 16, published 28)."""
    return (TINY_PATCH if preset == TINY_PRESET else PUBLISHED_PATCH) * MERGE


def spec_build(cfg, processor, init: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """The HF model of model.preset: tiny from the processor's tokenizer, published ones from model.weights'
    config.json; LoRA adapters injected where model.lora.towers says (lm, vision)."""
    if cfg.preset == TINY_PRESET:
        config = tiny_config(processor.tokenizer)
    elif cfg.weights:
        config = Qwen2_5_VLConfig.from_pretrained(cfg.weights, local_files_only=True)
    else:
        config = published_config(cfg.preset)
    config.expblip_image_size = PRESET_IMAGE_SIZE[cfg.preset]
    # this run's resolution, never one model.weights' config.json carries from an earlier run
    config.expblip_min_pixels, config.expblip_max_pixels = cfg.bounds[:2] or (0, 0)
    model = build_model(config, init=init, dtype=dtype)
    if cfg.lora.enabled:
        _add_lora(model, cfg.lora)
    return model


def _add_lora(model: nn.Module, settings) -> None:
    """peft LoRA on the LM (and with 'vision' in model.lora.towers the ViT); the merger trains or not per config."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(settings.towers) - {"lm", "vision"})
    if unknown:
        raise ValueError(f"model.lora.towers {unknown}: Qwen2.5-VL takes lm and vision")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=lora_targets(vision="vision" in settings.towers))
    inject_adapter_in_model(config, model, adapter_name="default")


def spec_freeze(model: nn.Module, cfg, stage: str, others_dtype: torch.dtype | None = None) -> None:
    """requires_grad per model.freeze_vision (the ViT), model.freeze_qformer (the merger, Qwen's projection) and
    model.freeze_lm; LoRA adapters train and their layers' own weights stay frozen. Frozen towers in
    model.frozen_dtype, everything else in `others_dtype` when given."""
    trains = {"vision": not cfg.freeze_vision, "merger": not cfg.freeze_qformer, "lm": not cfg.freeze_lm}
    frozen_dtype = getattr(torch, cfg.frozen_dtype)
    for name, param in model.named_parameters():
        adapter = ".lora_A." in name or ".lora_B." in name
        param.requires_grad = adapter or (trains[tower_of(name)] and ".base_layer." not in name)
        dtype = others_dtype if param.requires_grad or adapter else frozen_dtype
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)


def spec_checkpointing(model: nn.Module, towers) -> None:
    """Activation checkpointing of the ViT ('vision') and the LM ('lm'): transformers' per-layer checkpointing."""
    parts = {"vision": model.model.visual, "lm": model.model.language_model}
    for tower in towers:
        if tower not in parts:
            raise ValueError(f"model.checkpointing {tower!r}: Qwen2.5-VL has towers {sorted(parts)}")
        parts[tower].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def spec_text_inputs(processor, config, captions, prompts, max_tokens: int, text_only: bool = False,
                     image_sizes: Sequence[tuple[int, int]] | None = None) -> dict:
    """text_inputs with each sample's image tokens: of its image's (H, W) in `image_sizes` (dynamic resolution),
    else of the config's square training size."""
    if text_only:
        raise ValueError("Qwen2.5-VL has no text-only stage; train.stage=stage2")
    counts = ([tokens_of(config, size) for size in image_sizes] if image_sizes is not None
              else [image_tokens(config)] * len(captions))
    return text_inputs(processor, counts, captions, prompts, max_tokens)


def spec_pixel_inputs(config, pixels: torch.Tensor | Sequence[torch.Tensor]) -> dict:
    """Normalised images, square [B,3,S,S] or a ragged list of [3,H_i,W_i] (dynamic resolution) -> pixel_values
    (every image's patches, in order) and image_grid_thw [B,3], on their device."""
    v = config.vision_config
    if torch.is_tensor(pixels):
        flat, grid = patchify(pixels, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        return {"pixel_values": flat, "image_grid_thw": grid}
    parts = [patchify(p[None], v.patch_size, v.spatial_merge_size, v.temporal_patch_size) for p in pixels]
    return {"pixel_values": torch.cat([f for f, _ in parts]), "image_grid_thw": torch.cat([g for _, g in parts])}


def spec_prompt_length(config, processor, prompt: str = "", image_size: tuple[int, int] | None = None) -> int:
    """Tokens read before the answer: the chat turn around one image's tokens (of an H x W image at dynamic
    resolution; else of the config's square size, or the most an image can have)."""
    tokens = image_tokens(config) if image_size is None else tokens_of(config, image_size)
    return len(prompt_ids(processor, prompt, tokens))


def spec_generate(model, processor, images: dict, gen: GenerationConfig | None = None, prompt: str = "",
                  with_lengths: bool = False, **extra) -> list:
    return generate_captions(model, processor, images["pixel_values"], images["image_grid_thw"], gen, prompt,
                             with_lengths, **extra)


def spec_hidden_size(preset: str) -> int:
    dims = preset_dims(preset, 1)
    return max(dims["hidden_size"], dims["vision"]["hidden_size"])


def spec_load_pretrained(path, dtype: torch.dtype, placement: dict) -> nn.Module:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                              use_safetensors=True, **placement)


def spec_train_tokenizer(captions, cfg):
    """The tiny preset's processor around a tokenizer trained on the run's captions (its min/max pixels the run's
    dynamic resolution, when it has one)."""
    tokenizer = tiny_tokenizer(captions, cfg.tokenizer_vocab)
    return make_processor(tokenizer, *cfg.bounds[:2]) if cfg.bounds else make_processor(tokenizer)


def spec_save_export(state: dict, config: Qwen2_5_VLConfig, processor, out: str | Path, resolved_config_yaml: str = "",
                     extra_meta: dict | None = None, config_dtype: torch.dtype | None = None) -> Path:
    """A training run's export from its (possibly lazy, ZeRO-3-gathered) state: weights, config.json, the processor,
    generation_config.json (5 beams up to <|im_end|>), expblip.json and the run's config.yaml. Stock transformers
    reads it (AutoModelForImageTextToText; AutoProcessor where torchvision is installed)."""
    from expblip.model.weights import check_state, tied_aliases, write_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(config)
    state = {k: v for k, v in state.items() if k not in aliases}
    check_state(state, config, f"export to {out}")
    write_safetensors(state, out)
    config = Qwen2_5_VLConfig.from_dict(config.to_dict())  # a copy: the caller's config is left alone
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = str(config_dtype or torch.float32).removeprefix("torch.")
    config.save_pretrained(out)
    bounds = image_bounds(config)
    if bounds:  # stock transformers' processor resizes as training did
        processor.image_processor.size = {"shortest_edge": bounds[0], "longest_edge": bounds[1]}
    processor.save_pretrained(out)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(CAPTION_END)
    HFGenerationConfig(**GenerationConfig().hf_kwargs(end, tok.pad_token_id)).save_pretrained(out)
    meta = {"format": "full", "image_size": image_size(config), "mean": list(processor.image_processor.image_mean),
            "std": list(processor.image_processor.image_std), "caption_end_id": end, **(extra_meta or {})}
    (out / "expblip.json").write_text(json.dumps(meta, indent=2))
    if resolved_config_yaml:
        (out / "config.yaml").write_text(resolved_config_yaml)
    return out


def _spec():
    from expblip.model.spec import ModelSpec

    return ModelSpec(
        name="qwen2_5_vl", label="Qwen2.5-VL", model_type="qwen2_5_vl", architecture="Qwen2_5_VLForConditionalGeneration",
        presets=QWEN_VL_PRESETS, stages=("vision", "stage2"), build=spec_build,
        training_unit=spec_training_unit, freeze=spec_freeze_stage, checkpointing=spec_checkpointing,
        text_inputs=spec_text_inputs,
        pixel_inputs=spec_pixel_inputs, generate=spec_generate,
        prompt_length=spec_prompt_length,
        hidden_size=spec_hidden_size, image_size=image_size, preset_image_size=PRESET_IMAGE_SIZE.__getitem__,
        lm_family=lambda preset: QWEN2, read_outside_forward=lambda model: [],
        load_pretrained=spec_load_pretrained, tiny_presets=(TINY_PRESET,), train_tokenizer=spec_train_tokenizer,
        stage_inputs=spec_stage_inputs, load_tokenizer=load_processor, save_export=spec_save_export,
        trainable_export=False, pixel_unit=pixel_unit, bounds=image_bounds, pack=pack_inputs)


SPEC = _spec()
