"""BLIP-2 on transformers' Blip2 classes: presets, freezing, caption inputs with BLIP-2's label masking, generation.

Data flow (B images, Q query tokens, T caption tokens):
    pixel_values [B,3,S,S] -> ViT -> [B,P,Dv] -> Q-Former(Q learned queries) -> [B,Q,Dq] -> projection -> [B,Q,Dlm]
    LM input ids: [<image>]*Q + [BOS] + prompt + caption + END + <pad>...   (query outputs are scattered into <image>)
    labels:       -100 on <image>, BOS, the prompt and padding; caption tokens and the END token count.
BOS, END and the prompt's layout are the LM family's (expblip.model.family): OPT's "</s>" and "\\n" with an empty
prompt (the paper's), Qwen2.5's and Llama-3's chat turns and end-of-turn tokens. The LM is any causal LM that
transformers builds from its config (OPT, Qwen2, Llama); LoRA adapters are added by expblip.model.lora.

Nothing here imports Ray, DeepSpeed or MLflow: parallelism wraps this module from expblip.train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

from expblip.model.au_head import au_targets, masked_bce
from expblip.model.family import FAMILIES, Family
from expblip.model.generation import Generated, GenerationConfig, decode_new
from expblip.model.hf import from_config
from expblip.model.lora import TOWER_MODULES, LoraSettings, add_lora, is_adapter
from expblip.model.tokenizer import (
    bos_ids,
    caption_end_id,
    family_of_tokenizer,
    image_token_id,
    load_tokenizer,
    train_caption_tokenizer,
    wrap,
)

PresetName = Literal["tiny", "tiny-qwen2.5", "tiny-llama3", "tiny-h32", "tiny-qwen2.5-h32", "mid", "vitg-opt6.7b",
                     "vitg-opt2.7b", "vitb-opt2.7b", "vitg-qwen2.5-7b", "vitg-qwen2.5-3b", "vitg-qwen2.5-1.5b",
                     "vitg-llama3-8b", "vitg-llama3.2-3b", "vitg-llama3.2-1b",
                     # native VLMs (expblip.model.qwen_vl)
                     "tiny-qwen2.5-vl", "qwen2.5-vl-3b", "qwen2.5-vl-7b"]
Tower = Literal["vision", "qformer", "lm"]
# Tower shapes. Paper presets follow the public blip2-opt-* configs; tiny is a CPU debug model (hidden 64, 2 layers).
_VISION = {
    # Patch 16 (a 4x4 grid) and init 0.1: a random tiny ViT learns the synthetic AUs ~5x faster than at patch 8 /
    # init 0.02 (AU F1 on held-out faces 0.75 vs 0.26 after 750 steps; the default 1e-10 ignores the image).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                 patch_size=16, initializer_range=0.1),
    "vitg": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14),
    "vitb": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16, initializer_range=0.02),
    # mid: the paper presets' code paths (224 px, patch 14, BERT-base Q-Former, OPT's 50k vocabulary; sharded
    # checkpoints, 2-rank ZeRO-3 bf16, streaming loads) at 0.23 B parameters, for CPU checks
    "mid": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                image_size=224, patch_size=14, initializer_range=0.02),
}
_QFORMER = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 cross_attention_frequency=1, max_position_embeddings=128,
                 initializer_range=0.2),  # at 0.02 a random tiny Q-Former's [CLS] ignores the text (stage 1 stalls)
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 cross_attention_frequency=2),
}
_TINY_LM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama-3.1 / 3.2's
# name -> (family, text config): OPT as the public blip2-opt-* configs; Qwen2.5 and Llama-3 as their public configs
# (the LM's own config.json replaces these when model.lm_weights names its directory); tiny: CPU debug LMs
_LM: dict[str, tuple[str, dict]] = {
    "tiny": ("opt", dict(_TINY_LM, ffn_dim=128, word_embed_proj_dim=64, dropout=0.0)),
    "qwen-tiny": ("qwen2", dict(_TINY_LM, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-tiny": ("llama", dict(_TINY_LM, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                             max_position_embeddings=2048, word_embed_proj_dim=2560, vocab_size=50272)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                             max_position_embeddings=2048, word_embed_proj_dim=4096, vocab_size=50272)),
    "opt-mid": ("opt", dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=4, num_attention_heads=16,
                            max_position_embeddings=2048, word_embed_proj_dim=1024, vocab_size=50272)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2.5-3b": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                                rms_norm_eps=1e-5, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                  rope_parameters=_LLAMA3_ROPE)),
    "llama3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, head_dim=64,
                                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                  rope_parameters=_LLAMA3_ROPE)),
}
PRESETS: dict[str, tuple[str, str, str, int]] = {  # name -> (vision, qformer, lm, query tokens)
    "tiny": ("tiny", "tiny", "tiny", 8),
    "tiny-qwen2.5": ("tiny", "tiny", "qwen-tiny", 8),
    "tiny-llama3": ("tiny", "tiny", "llama-tiny", 8),
    "mid": ("mid", "base", "opt-mid", 32),
    "vitg-opt6.7b": ("vitg", "base", "opt-6.7b", 32),
    "vitg-opt2.7b": ("vitg", "base", "opt-2.7b", 32),
    "vitb-opt2.7b": ("vitb", "base", "opt-2.7b", 32),
    "vitg-qwen2.5-7b": ("vitg", "base", "qwen2.5-7b", 32),
    "vitg-qwen2.5-3b": ("vitg", "base", "qwen2.5-3b", 32),
    "vitg-qwen2.5-1.5b": ("vitg", "base", "qwen2.5-1.5b", 32),
    "vitg-llama3-8b": ("vitg", "base", "llama3-8b", 32),
    "vitg-llama3.2-3b": ("vitg", "base", "llama3.2-3b", 32),
    "vitg-llama3.2-1b": ("vitg", "base", "llama3.2-1b", 32),
}
# vLLM-servable variants (docs/vllm.md): a tiny preset's LM in heads of 32, the smallest head size vLLM's CPU attention
# takes (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes; the tiny LMs' 16 stops vLLM at start-up:
# "Unsupported CPU attention configuration: head_dim=16"). The same parameters; Qwen keeps its 2:1 grouped queries.
VLLM_HEAD_DIM = 32
H32_PRESETS = {"tiny-h32": "tiny", "tiny-qwen2.5-h32": "tiny-qwen2.5"}  # name -> the tiny preset it re-heads


def with_head_dim(dims: dict, head_dim: int) -> dict:
    """An LM text config in heads of `head_dim` (hidden size unchanged; key/value heads in the same ratio)."""
    heads = dims["hidden_size"] // head_dim
    out = dict(dims, num_attention_heads=heads)
    if "num_key_value_heads" in dims:
        out["num_key_value_heads"] = max(1, dims["num_key_value_heads"] * heads // dims["num_attention_heads"])
    return out


for _name, _base in H32_PRESETS.items():
    _vision, _qformer, _lm, _queries = PRESETS[_base]
    _LM[f"{_lm}-h32"] = (_LM[_lm][0], with_head_dim(_LM[_lm][1], VLLM_HEAD_DIM))
    PRESETS[_name] = (_vision, _qformer, f"{_lm}-h32", _queries)
TINY_PRESETS = ("tiny", "tiny-qwen2.5", "tiny-llama3", *H32_PRESETS)  # train their tokenizer on the captions


def preset_family(preset: str) -> Family:
    """The LM family of a BLIP-2 preset."""
    return FAMILIES[_LM[PRESETS[preset][2]][0]]




@dataclass
class ModelConfig:
    """Which BLIP-2 to build and which of its parts train."""

    preset: PresetName = "tiny"
    tokenizer: str = ""  # local tokenizer dir; '' = train one on the captions (tiny presets) / from init_from's run
    tokenizer_vocab: int = 512  # size of the trained tiny tokenizer
    # initial weights ('' = random init): an HF-format BLIP-2 directory (single or sharded safetensors), an expblip
    # export or run directory, or a LAVIS .pth; a local path or s3://... Streamed into each rank's partitions.
    weights: str = ""
    # towers from their own sources, replacing model.weights' (which may then be '' or hold the Q-Former): the ViT
    # from an HF / LAVIS BLIP-2 or EVA's eva_vit_g.pth (its vision_model.* only); the language model from its HF
    # directory as published (Qwen2.5, Llama-3, OPT; its config.json shapes the LM, its tokenizer is the default
    # model.tokenizer). A separate LM takes the projection with it: a new one starts (allow language_projection.**)
    vision_weights: str = ""
    lm_weights: str = ""
    # parameters meant to start new although model.weights lacks them (globs over the unit's parameter names, '*'
    # within a dotted part, '**' across: e.g. 'itm_head.**'); any other missing tensor is an error
    allow_missing: tuple[str, ...] = ()
    # towers that recompute their activations in backward instead of storing them (activation checkpointing)
    checkpointing: tuple[Tower, ...] = ()
    num_query_tokens: int = 0  # 0 = the preset's (32 for paper presets)
    freeze_vision: bool = True  # paper step 1 and default step 2; the released fine-tune config unfreezes it
    freeze_qformer: bool = False
    freeze_lm: bool = True  # OPT stays frozen in every paper stage; the tiny world's 'lm' stage trains it
    dropout: float = 0.1  # Q-Former hidden dropout (0 makes resumed runs bit-comparable)
    # dtype of the *frozen* ViT / OPT (halves their memory); the trainable Q-Former, queries and projection stay fp32
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # LoRA adapters on frozen towers (stage 2): the adapters train, the tower's own weights stay frozen
    lora: LoraSettings = field(default_factory=LoraSettings)
    # dynamic resolution (Qwen2.5-VL): each image resized, aspect kept, to a multiple of the ViT's patch x merge px
    # holding min_pixels..max_pixels pixels (its processor's rule), alike in training, evaluation, serving and the
    # export's processor; max_pixels bounds an image's tokens (plan.py counts it). 0, 0 = square images of the
    # preset's size
    min_pixels: int = 0
    max_pixels: int = 0

    def __post_init__(self) -> None:
        from expblip.model.spec import spec_for_preset

        spec = spec_for_preset(self.preset)  # names every family's presets when there is no such preset
        if self.preset not in spec.tiny_presets and not (self.tokenizer or self.weights or self.lm_weights):
            raise ValueError(f"model.preset {self.preset!r} needs model.tokenizer (a local directory holding the "
                             f"{self.family.name} tokenizer)")
        unknown = sorted(set(self.checkpointing) - {"vision", "qformer", "lm"})
        if unknown:
            raise ValueError(f"model.checkpointing {unknown}: choose towers among vision, qformer, lm")
        self._check_dynamic(spec)
        for tower, frozen in (("lm", self.freeze_lm), ("vision", self.freeze_vision)):
            if tower in self.lora.towers and not frozen:
                raise ValueError(f"model.lora.towers has {tower}: its own weights stay frozen under LoRA; set "
                                 f"model.freeze_{tower}=true (or take {tower} out of model.lora.towers)")

    def _check_dynamic(self, spec) -> None:
        if not (self.min_pixels or self.max_pixels):
            return
        if spec.pixel_unit is None:
            raise ValueError(f"model.min_pixels / model.max_pixels: model.preset {self.preset} ({spec.label}) reads "
                             f"square {self.image_size}-px images; set both to 0, or choose a preset of a family "
                             "with dynamic resolution (Qwen2.5-VL)")
        if not (self.min_pixels and self.max_pixels):
            raise ValueError("dynamic resolution needs both model.min_pixels and model.max_pixels (0 and 0 = square "
                             f"images), got {self.min_pixels} and {self.max_pixels}")
        from expblip.pixels import check_bounds

        check_bounds(self.bounds, "model.")

    @property
    def bounds(self) -> tuple[int, ...]:
        """(min_pixels, max_pixels, unit px) of dynamic resolution; () for square images."""
        if not self.max_pixels:
            return ()
        from expblip.model.spec import spec_for_preset

        return self.min_pixels, self.max_pixels, spec_for_preset(self.preset).pixel_unit(self.preset)

    @property
    def family(self) -> Family:
        """The conventions of the preset's LM (expblip.model.family), from its model family."""
        from expblip.model.spec import spec_for_preset

        return spec_for_preset(self.preset).lm_family(self.preset)

    @property
    def has_weights(self) -> bool:
        return bool(self.weights or self.vision_weights or self.lm_weights)

    @property
    def weights_id(self) -> str:
        """Where the initial weights come from, in one string (checkpoints and exports record it)."""
        from expblip.model.weights import towers_label

        return towers_label(self.weights, self.vision_weights, self.lm_weights)

    @property
    def image_size(self) -> int:
        from expblip.model.spec import spec_for_preset

        return spec_for_preset(self.preset).preset_image_size(self.preset)

    @property
    def query_tokens(self) -> int:
        return self.num_query_tokens or PRESETS[self.preset][3]


def blip2_config(cfg: ModelConfig, tokenizer) -> Blip2Config:
    """A transformers Blip2Config for the preset, with the LM vocabulary and special ids of `tokenizer`."""
    vision, qformer, lm, _ = PRESETS[cfg.preset]
    family, dims = _LM[lm]
    if family_of_tokenizer(tokenizer).name != family:
        raise ValueError(f"model.preset {cfg.preset} has a {family} language model but the tokenizer follows "
                         f"{family_of_tokenizer(tokenizer).name}'s conventions; give model.tokenizer the LM's own")
    v = _VISION[vision]
    text = _lm_dims(cfg, family, dims)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    bos = bos_ids(tokenizer)
    text_config = FAMILIES[family].config_class(**text, pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=bos[0] if bos else None,
                                                eos_token_id=caption_end_id(tokenizer))
    return Blip2Config(
        vision_config=Blip2VisionConfig(**v).to_dict(),
        qformer_config=Blip2QFormerConfig(**_QFORMER[qformer], encoder_hidden_size=v["hidden_size"],
                                          hidden_dropout_prob=cfg.dropout).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=cfg.query_tokens,
        image_token_index=image_token_id(tokenizer),
    )


_NOT_SHAPE = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "pad_token_id",
              "bos_token_id", "eos_token_id", "use_cache", "auto_map")


def _lm_dims(cfg: ModelConfig, family: str, dims: dict) -> dict:
    """The preset's LM shape, or (model.lm_weights) the one in the LM directory's config.json, which then decides:
    the family must match the preset's."""
    if not cfg.lm_weights:
        return dict(dims)
    from expblip.model.weights import read_lm_config

    theirs = read_lm_config(cfg.lm_weights)
    if theirs.get("model_type") != family:
        raise ValueError(f"model.lm_weights {cfg.lm_weights} holds a {theirs.get('model_type')!r} model but "
                         f"model.preset {cfg.preset} is a {family} preset; choose a preset of its family")
    return {k: v for k, v in theirs.items() if k not in _NOT_SHAPE}


def build_model(cfg: ModelConfig, tokenizer, init: bool = True,
                dtype: torch.dtype | None = None) -> Blip2ForConditionalGeneration:
    """BLIP-2 for the preset, random-initialised, or (init=False) with uninitialised parameters that the caller
    fills (weights are loaded separately: expblip.train.load, expblip.model.weights)."""
    model = construct(blip2_config(cfg, tokenizer), init, dtype)
    if cfg.lora.enabled:  # after construct: its no_init_weights would also skip peft's initialisation
        add_lora(model, cfg.lora, cfg.family)
    return model


def construct(config: Blip2Config, init: bool = True, dtype: torch.dtype | None = None) -> Blip2ForConditionalGeneration:
    """Blip2ForConditionalGeneration from its config (expblip.model.hf.from_config: SDPA attention; init=False
    allocates without initialising, for weights loaded afterwards)."""
    return from_config(Blip2ForConditionalGeneration, config, init, dtype)


def preset_hidden_size(preset: str) -> int:
    """The largest hidden size of a preset's towers (what ZeRO buckets are sized from: the LM's, at paper scale)."""
    vision, qformer, lm, _ = PRESETS[preset]
    return max(_VISION[vision]["hidden_size"], _QFORMER[qformer]["hidden_size"], _LM[lm][1]["hidden_size"])


def enable_checkpointing(model: Blip2ForConditionalGeneration, towers: tuple[str, ...]) -> None:
    """Activation checkpointing per tower: each layer keeps its input only and recomputes the rest in backward.

    transformers' own per-layer checkpointing (GradientCheckpointingLayer), non-reentrant: it also works for a
    frozen tower whose activations are needed only for the gradient of its input (the OPT in stage 2)."""
    parts = {"vision": model.vision_model, "qformer": model.qformer, "lm": model.language_model}
    for tower in towers:
        parts[tower].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_freezing(model: Blip2ForConditionalGeneration, cfg: ModelConfig, stage: str,
                   others_dtype: torch.dtype | None = None) -> None:
    """Set requires_grad per the config; the 'lm' stage trains only the language model. LoRA adapters train and
    their tower's own weights stay frozen (model.lora.towers; a Q-Former under LoRA keeps training its query tokens
    and projection unless model.freeze_qformer). Frozen weights go to model.frozen_dtype; `others_dtype` (fp32 when
    the engine computes in fp32) is what every other parameter is cast to, for a model built in the frozen towers'
    dtype (None: leave them)."""
    trains = {
        "vision_model": not cfg.freeze_vision,
        "qformer": not cfg.freeze_qformer and "qformer" not in cfg.lora.towers,
        "query_tokens": not cfg.freeze_qformer,
        "language_projection": not cfg.freeze_qformer,
        "language_model": not cfg.freeze_lm,
    }
    if stage == "stage1":  # representation learning: the LM and its projection take no part
        trains.update(language_model=False, language_projection=False)
    if stage in ("lm", "vision"):  # the tiny world's tower pre-training stages train one tower each
        tower = "language_model" if stage == "lm" else "vision_model"
        trains = {name: name == tower for name in trains}
    adapted = {TOWER_MODULES[t] for t in cfg.lora.towers}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        param.requires_grad = top in adapted if is_adapter(name) else trains[top]
    frozen = _cast_frozen_towers(model, getattr(torch, cfg.frozen_dtype))
    if others_dtype is not None:
        for name, param in model.named_parameters():
            if not (name.split(".")[0] in frozen and not is_adapter(name)) and param.dtype != others_dtype:
                param.data = param.data.to(others_dtype)  # a ZeRO-3 partition is cast by expblip.train.engine


def _cast_frozen_towers(model: Blip2ForConditionalGeneration, dtype: torch.dtype) -> set[str]:
    """Frozen ViT / OPT weights to `dtype` (a tower under LoRA counts as frozen: its adapters are left alone); the
    dtype boundaries are then crossed in both directions. Returns the names of the frozen towers.

    ViT -> Q-Former: transformers casts the encoder states to the Q-Former's dtype. Q-Former -> projection:
    transformers casts the query output to the *ViT's* dtype, so a pre-hook casts it back to the projection's.
    Projection -> LM: transformers casts the projected queries to the LM's embedding dtype. LoRA layers cast
    their input to the adapters' dtype and their output back to the base layer's (peft).
    """
    frozen = {name for name in ("vision_model", "language_model")
              if not any(p.requires_grad for n, p in getattr(model, name).named_parameters() if not is_adapter(n))}
    if dtype == torch.float32:
        return frozen
    for name in frozen:
        for pname, param in getattr(model, name).named_parameters():
            if not is_adapter(pname):
                param.data = param.data.to(dtype)  # a ZeRO-3 partition is cast by expblip.train.engine
    if not getattr(model.language_projection, "_expblip_casts_input", False):
        model.language_projection.register_forward_pre_hook(_to_weight_dtype)
        model.language_projection._expblip_casts_input = True
    return frozen


def _to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class CaptionModel(nn.Module):
    """The trainable unit: BLIP-2's captioning loss, or the LM's text-only loss for the 'lm' stage."""

    def __init__(self, blip2: Blip2ForConditionalGeneration):
        super().__init__()
        self.blip2 = blip2

    def forward(self, input_ids, attention_mask, labels, pixel_values=None) -> torch.Tensor:
        if pixel_values is None:
            return self.prefix_lm_loss(input_ids, attention_mask, labels)
        return self.blip2(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                          labels=labels).loss

    def prefix_lm_loss(self, input_ids, attention_mask, labels, noise: float = 0.1) -> torch.Tensor:
        """'lm' stage: the LM learns the caption language *and* to read a soft prefix.

        The <image> positions [B, Q] hold the mean embedding of the caption's own tokens (plus noise) instead of
        query outputs: a frozen LM that only ever saw a constant prefix ignores whatever the Q-Former puts there
        later, as a 2-layer OPT has none of the in-context reading a pre-trained OPT brings.
        """
        lm = self.blip2.language_model
        embeds = lm.get_input_embeddings()(input_ids)  # [B, L, D]
        content = (labels != -100).unsqueeze(-1).to(embeds.dtype)  # caption tokens and the end token
        mean = (embeds * content).sum(1, keepdim=True) / content.sum(1, keepdim=True).clamp(min=1)  # [B, 1, D]
        prefix = mean + noise * mean.std() * torch.randn_like(embeds)
        is_image = (input_ids == self.blip2.config.image_token_id).unsqueeze(-1)
        embeds = torch.where(is_image, prefix, embeds)
        return lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss


class VisionPretrainModel(nn.Module):
    """The tiny world's 'vision' stage: the ViT learns to see AUs through a linear multi-label head.

    Paper presets start from EVA-CLIP's pre-trained ViT-g; a random tiny ViT earns a comparable starting point here
    (DESIGN.md). The head is not part of BLIP-2 and is not exported. Shapes: pixels [B,3,S,S] -> pooled [B,Dv] -> [B,A].
    """

    def __init__(self, blip2: Blip2ForConditionalGeneration, num_targets: int):
        super().__init__()
        self.blip2 = blip2
        self.head = nn.Linear(blip2.config.vision_config.hidden_size, num_targets)

    def forward(self, pixel_values, targets, target_mask) -> torch.Tensor:
        hidden = self.blip2.vision_model(pixel_values=pixel_values).last_hidden_state.mean(1)  # [B, Dv]
        return masked_bce(self.head(hidden), targets, target_mask)


def caption_inputs(tokenizer, captions: list[str], num_query: int, max_tokens: int,
                   prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tokenise captions into BLIP-2 LM inputs and labels (num_query=0 for the text-only 'lm' stage).

    `prompts`: each sample's task instruction ('' or None: none, the paper's captioning), laid out as the LM
    family's chat turn (expblip.model.family) between BOS and the caption; the loss masks it with BOS and the image
    tokens. Returns input_ids / attention_mask / labels, each [B, num_query + len(BOS) + P_i + T_i, padded] with the
    caption part T_i <= max_tokens.
    """
    end = caption_end_id(tokenizer)
    body = tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
    rows = [ids[: max_tokens - 1] + [end] for ids in body]  # truncated captions still end with the end token
    prefix = [image_token_id(tokenizer)] * num_query + bos_ids(tokenizer)
    heads = [prefix + instruction_ids(tokenizer, p) for p in (prompts or [""] * len(rows))]
    width = max(len(h) + len(r) for h, r in zip(heads, rows, strict=True))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for i, (head, row) in enumerate(zip(heads, rows, strict=True)):
        n = len(head) + len(row)
        input_ids[i, :n] = torch.tensor(head + row)
        labels[i, len(head) : n] = torch.tensor(row)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def instruction_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of a task instruction in the tokenizer's family's turn layout; [] for none."""
    text = family_of_tokenizer(tokenizer).prompt_text(instruction)
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(model: Blip2ForConditionalGeneration, tokenizer, prompt: str, batch: int) -> torch.Tensor:
    """[B, Q + len(BOS) + P] LM input ids: Q image tokens, BOS (OPT's </s>, Llama-3's <|begin_of_text|>, none for
    Qwen2.5), then the instruction in the family's turn layout (the exported chat template's layout). An empty prompt
    gives the paper's: image tokens and BOS only."""
    ids = [image_token_id(tokenizer)] * model.config.num_query_tokens + bos_ids(tokenizer)
    ids += instruction_ids(tokenizer, prompt)
    return torch.tensor([ids] * batch, dtype=torch.long)


@torch.no_grad()
def generate_captions(model: Blip2ForConditionalGeneration, tokenizer, pixel_values: torch.Tensor,
                      gen: GenerationConfig | None = None, prompt: str = "", with_lengths: bool = False,
                      **extra) -> list[str] | list[Generated]:
    """Captions for a batch of images; the prompt is empty (image tokens + BOS) as in the paper, or ``prompt``, a
    task instruction laid out as the LM family's turn, the same for every image of the batch. ``with_lengths``:
    Generated tuples instead of strings."""
    gen = gen or GenerationConfig()
    end = caption_end_id(tokenizer)
    input_ids = prompt_ids(model, tokenizer, prompt, pixel_values.shape[0]).to(pixel_values.device)
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         **gen.hf_kwargs(end, tokenizer.pad_token_id), **extra)
    return decode_new(tokenizer, out[:, input_ids.shape[1]:], end, with_lengths)  # generate() returns the prompt first


# ---------------------------------------------------------------- BLIP-2 as a model family (expblip.model.spec)


def training_unit(cfg, tokenizer, qformer_tokenizer=None, init: bool = True,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """The module the engine wraps for cfg.train.stage; each keeps the HF model at `.blip2` (what gets exported).
    `cfg` is the run's expblip.config.Config; stage 1 needs the Q-Former's text tokenizer."""
    if cfg.train.stage == "stage1":
        from expblip.model.stage1 import build_stage1

        return build_stage1(cfg.model, cfg.stage1, tokenizer, qformer_tokenizer, init=init, dtype=dtype)
    blip2 = build_model(cfg.model, tokenizer, init=init, dtype=dtype)
    if cfg.train.stage == "vision":
        return VisionPretrainModel(blip2, len(cfg.train.vision_aus))
    return CaptionModel(blip2)


def text_inputs(tokenizer, config: Blip2Config, captions: list[str], prompts: list[str] | None, max_tokens: int,
                text_only: bool = False) -> dict[str, torch.Tensor]:
    """caption_inputs with the config's query tokens as image placeholders (the 'lm' stage keeps them too, so that
    the frozen LM later meets the query outputs at positions it was trained on)."""
    return caption_inputs(tokenizer, captions, config.num_query_tokens, max_tokens, prompts)


def pixel_inputs(config: Blip2Config, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """BLIP-2 reads the normalised square images as they are: {"pixel_values": [B, 3, S, S]}."""
    return {"pixel_values": pixels}


def generate(model: Blip2ForConditionalGeneration, tokenizer, images: dict, gen: GenerationConfig | None = None,
             prompt: str = "", with_lengths: bool = False, **extra) -> list[str] | list[Generated]:
    """generate_captions over pixel_inputs' dict."""
    return generate_captions(model, tokenizer, images["pixel_values"], gen, prompt, with_lengths, **extra)


def prompt_length(config: Blip2Config, tokenizer, prompt: str = "") -> int:
    """Tokens read before the answer: query tokens, BOS and the prompt in the family's turn layout."""
    return config.num_query_tokens + len(bos_ids(tokenizer)) + len(instruction_ids(tokenizer, prompt))


def load_pretrained(path, dtype: torch.dtype, placement: dict) -> Blip2ForConditionalGeneration:
    """An HF-format BLIP-2 directory in `dtype` (placement: transformers' device_map or nothing). The Q-Former and
    query tokens (0.1 B) stay fp32 whatever `dtype`, as their fp32 master weights were (transformers'
    _keep_in_fp32_modules does that for fp16 only); its output is cast to the towers' dtype."""
    model = Blip2ForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                          use_safetensors=True, **placement)
    if dtype != torch.float32:
        model.qformer.float()
        model.query_tokens.data = model.query_tokens.data.float()
    return model


def stage_inputs(cfg, batch: dict, qformer_tokenizer=None) -> dict:
    """Forward arguments beside the pixels for BLIP-2's own stages: the vision stage's AU targets, stage 1's
    Q-Former text and its cross-rank gather (host tensors; the loop moves them to the device)."""
    if cfg.train.stage == "vision":
        return au_targets(batch["labels"], cfg.train.vision_aus)
    from expblip.model.stage1 import all_gather_with_grad, qformer_text_inputs

    text = qformer_text_inputs(qformer_tokenizer, batch["captions"], cfg.stage1.max_text_tokens)
    return {**text, "gather": all_gather_with_grad}


def train_tokenizer(captions: list[str], cfg: ModelConfig):
    """The tiny presets' tokenizer, trained on the run's captions and task prompts (deterministic)."""
    from tokenizers import Tokenizer

    text = train_caption_tokenizer(captions, cfg.tokenizer_vocab, cfg.family).backend_tokenizer.to_str()
    return wrap(Tokenizer.from_str(text))


def _image_size(config) -> int:
    return config.vision_config.image_size


def load_qformer_tokenizer(path):
    """Stage 1's Q-Former text tokenizer from a directory (expblip.model.stage1, imported on use: it builds on
    this module)."""
    from expblip.model import stage1

    return stage1.load_qformer_tokenizer(path)


def train_qformer_tokenizer(captions: list[str], vocab_size: int):
    """A Q-Former text tokenizer trained on captions (the tiny preset's; expblip.model.stage1)."""
    from expblip.model import stage1

    return stage1.train_qformer_tokenizer(captions, vocab_size)


def _save_export(state, config, tokenizer, out, resolved_config_yaml="", extra_meta=None, config_dtype=None):
    """save_hf_dir (expblip.model.weights): stock Blip2ForConditionalGeneration loads it."""
    from expblip.model.weights import save_hf_dir

    return save_hf_dir(state, config, tokenizer, out, resolved_config_yaml, extra_meta=extra_meta,
                       config_dtype=config_dtype)


def _spec():
    from expblip.model.spec import ModelSpec

    return ModelSpec(
        name="blip2", label="BLIP-2", model_type="blip-2", architecture="Blip2ForConditionalGeneration", presets=tuple(PRESETS),
        stages=("lm", "vision", "stage1", "stage2"), build=build_model,
        training_unit=training_unit, freeze=apply_freezing, checkpointing=enable_checkpointing,
        text_inputs=text_inputs, pixel_inputs=pixel_inputs, generate=generate, prompt_length=prompt_length,
        hidden_size=preset_hidden_size, image_size=_image_size,
        preset_image_size=lambda preset: _VISION[PRESETS[preset][0]]["image_size"], lm_family=preset_family,
        read_outside_forward=lambda model: [model.query_tokens], load_pretrained=load_pretrained,
        load_tokenizer=load_tokenizer, tiny_presets=TINY_PRESETS, train_tokenizer=train_tokenizer,
        stage_inputs=stage_inputs,
        load_stage1_tokenizer=load_qformer_tokenizer, train_stage1_tokenizer=train_qformer_tokenizer,
        save_export=_save_export)


SPEC = _spec()
