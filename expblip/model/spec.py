"""The model interface: what the training loop, the evaluator, the server and plan.py ask of a model family.

A family (BLIP-2: expblip.model.blip2; Qwen2.5-VL: expblip.model.qwen_vl) is one ModelSpec, found from a preset
(training) or from an export's config.json (everything that loads an export):

    spec = spec_for_preset(cfg.model.preset)                  # the loop
    hf = spec.build(cfg.model, tokenizer, init=True)          # transformers' model, LoRA added where configured
    unit = spec.training_unit(cfg, tokenizer, extras, ...)    # the module the engine wraps; spec.hf_model(unit) is hf
    inputs = spec.text_inputs(tokenizer, hf.config, captions, prompts, max_tokens)   # ids, mask, labels
    inputs |= spec.pixel_inputs(hf.config, pixels)           # normalised [B,3,S,S] -> what its forward takes
    captions = spec.generate(hf, tokenizer, spec.pixel_inputs(hf.config, pixels), gen, prompt)

    spec = spec_for_config(export_config)                     # the captioner, the evaluator and the server

In the spirit of torchtitan's train spec: callers hold a spec and call it; they never import a family's module, so
a new family is a new module and one line in _FAMILIES. Nothing here imports Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One model family. Every callable takes the family's HF model (or its config) and plain tensors."""

    name: str  # "blip2", "qwen2_5_vl"
    label: str  # how reports name it: "BLIP-2", "Qwen2.5-VL"
    model_type: str  # config.json's model_type of its HF model (how an export says which family it is)
    architecture: str  # the transformers class an export loads with (config.json "architectures")
    presets: tuple[str, ...]
    stages: tuple[str, ...]  # the training stages it has (train.stage)
    # (model_cfg, tokenizer, init=True, dtype=None) -> the HF model, LoRA adapters added where configured
    build: Callable[..., nn.Module]
    # (cfg: Config, tokenizer, extra_tokenizer, init, dtype) -> the module the engine wraps for cfg.train.stage
    training_unit: Callable[..., nn.Module]
    # (hf_model, model_cfg, stage, others_dtype=None): requires_grad and frozen dtypes per the config
    freeze: Callable[..., None]
    # (hf_model, towers): activation checkpointing per tower
    checkpointing: Callable[..., None]
    # (tokenizer, hf_config, captions, prompts | None, max_tokens, text_only=False) -> host tensors: input_ids,
    # attention_mask, labels (prompt, image placeholders and padding masked)
    text_inputs: Callable[..., dict]
    # (hf_config, pixels: normalised [B,3,S,S] on the device) -> the forward's image arguments
    pixel_inputs: Callable[..., dict]
    # (hf_model, tokenizer, image inputs, gen, prompt='', with_lengths=False, **generate_kwargs) -> captions
    generate: Callable[..., list]
    # (hf_config, tokenizer, prompt) -> tokens the model reads before it answers
    prompt_length: Callable[..., int]
    # preset -> the largest hidden size of its towers (ZeRO bucket sizes)
    hidden_size: Callable[[str], int]
    # preset -> the square size of its training images; preset -> its LM's conventions (expblip.model.family)
    preset_image_size: Callable[[str], int]
    lm_family: Callable[[str], object]
    # hf_config -> the square image size its pixels are resized to
    image_size: Callable[..., int]
    # hf_model -> parameters its generate() reads outside any module's forward (ZeRO-3 must gather them by hand)
    read_outside_forward: Callable[..., list]
    # (export dir, dtype, placement: transformers' device_map kwargs) -> its HF model, eval() left to the caller
    load_pretrained: Callable[..., nn.Module]
    # (dir) -> what the family's functions take as `tokenizer` (BLIP-2: the LM's tokenizer; Qwen2.5-VL: its processor)
    load_tokenizer: Callable[..., object]
    tiny_presets: tuple[str, ...]  # presets whose tokenizer is trained on the run's captions
    # (captions, model_cfg) -> that tokenizer (deterministic: every rank would train the same)
    train_tokenizer: Callable[..., object]
    # (cfg: Config, batch, extra_tokenizer) -> forward arguments beside the pixels for the family's own stages
    # (those other than 'lm' and 'stage2'): host tensors, moved to the device by the loop, and callables
    stage_inputs: Callable[..., dict]
    # (state, hf_config, tokenizer, out, resolved_config_yaml, extra_meta, config_dtype) -> the export directory
    # (full: frozen towers included, adapters merged); state values may be lazy (gathered while written)
    save_export: Callable[..., object]
    trainable_export: bool = True  # writes export-trainable/ (trained tensors + frozen towers' fingerprints)
    # stage 1's text tokenizer (BLIP-2's Q-Former reads BERT's): (dir) -> it, (captions, vocab_size) -> a trained one
    load_stage1_tokenizer: Callable[..., object] | None = None
    train_stage1_tokenizer: Callable[..., object] | None = None
    # dynamic resolution (model.min_pixels / max_pixels): preset -> the px its image sides are multiples of (patch x
    # merge), hf_config -> the export's (min_pixels, max_pixels, unit) or () for square images. None / () : the
    # family reads square images only. Its pixel_inputs then also take a list of [3, H_i, W_i], and its text_inputs
    # an image_sizes list (each image's own number of image tokens)
    pixel_unit: Callable[[str], int] | None = None
    bounds: Callable[..., tuple] = lambda config: ()
    # (hf_model, text_inputs of a padded caption batch (host), image_sizes, max_tokens) -> its packed rows (host), each
    # sample with its own positions and attention (data.pack_tokens); None: the family does not pack
    pack: Callable[..., dict] | None = None

    @staticmethod
    def hf_model(unit: nn.Module) -> nn.Module:
        """The HF model inside a training unit (what is exported)."""
        return getattr(unit, hf_attr(unit))


def hf_attr(unit: nn.Module) -> str:
    """The attribute at which a training unit keeps its HF model, which is also its state-dict prefix: the unit
    class's HF_ATTR (Qwen2.5-VL's units: "vlm"), else BLIP-2's "blip2"."""
    return getattr(unit, "HF_ATTR", "blip2")


# family name -> module that defines SPEC (imported on first use: a family's imports cost only its users)
_FAMILIES = {"blip2": "expblip.model.blip2", "qwen2_5_vl": "expblip.model.qwen_vl"}


@functools.cache
def families() -> dict[str, ModelSpec]:
    """Every registered family, by name (imported once: the loop asks for its spec at every step)."""
    return {name: importlib.import_module(module).SPEC for name, module in _FAMILIES.items()}


def spec_for_preset(preset: str) -> ModelSpec:
    """The family of a model preset (model.preset)."""
    for spec in families().values():
        if preset in spec.presets:
            return spec
    known = sorted(p for s in families().values() for p in s.presets)
    raise ValueError(f"model.preset {preset!r} does not exist; choose one of {known}")


def spec_for_config(config) -> ModelSpec:
    """The family of an HF config (an export's config.json, as a dict or a PretrainedConfig)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for spec in families().values():
        if kind == spec.model_type:
            return spec
    raise ValueError(f"model type {kind!r} is not a family expblip knows; known: "
                     f"{sorted(s.model_type for s in families().values())}")
