"""Language-model families: what BLIP-2's causal LM is (transformers builds any of them from its config with
AutoModelForCausalLM), and the conventions each family's own checkpoints were trained with.

    family = FAMILIES["qwen2"]
    family.prompt_text("List the active action units.")   # '<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n'
    family_of(blip2_config)                                # from text_config.model_type

Per family: the text config class; the caption end token (the generation EOS: OPT's "\\n" as the released Exp-BLIP
code, the end-of-turn token of the chat models otherwise); the token between the image tokens and the prompt (OPT's
"</s>", Llama-3's "<|begin_of_text|>", none for Qwen2.5, whose tokenizer adds no BOS); how a task instruction is laid
out (the family's chat turn; an empty instruction adds nothing: the paper's prompt); the default LoRA targets; and
the special tokens of the tiny tokenizers trained for the CPU presets, in id order.

LM input of one sample (Q query tokens):  [<image>]*Q  [BOS?]  prompt_text(instruction)  caption  END
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, OPTConfig, PretrainedConfig, Qwen2Config

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Family:
    """One causal-LM family's conventions (see the module docstring)."""

    name: str  # transformers' text_config.model_type
    config_class: type[PretrainedConfig]
    caption_end: str  # the token every caption ends with, and generation's EOS
    bos: str | None  # the token after the image tokens (None: nothing)
    pad: str
    turn: str  # how a non-empty instruction is laid out ({prompt} is replaced)
    lora_targets: tuple[str, ...]  # peft target_modules (module-name suffixes) of the LM
    tiny_special_tokens: tuple[str, ...]  # the tiny tokenizer's special tokens, ids 0..n-1
    # a reserved special token that becomes <image> when the tokenizer has none and its vocabulary fills the LM's
    # embedding (Llama-3: 128,256 tokens, 128,256 rows); '' = <image> is added as a new token
    image_slot: str = ""

    def prompt_text(self, instruction: str) -> str:
        """The text after the image tokens (and BOS) for an instruction; '' for none (the paper's prompt)."""
        return self.turn.replace("{prompt}", instruction) if instruction else ""


OPT = Family(
    name="opt", config_class=OPTConfig, caption_end="\n", bos="</s>", pad="<pad>", turn="{prompt}",
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    tiny_special_tokens=("<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN))
QWEN2 = Family(
    name="qwen2", config_class=Qwen2Config, caption_end="<|im_end|>", bos=None, pad="<|endoftext|>",
    turn="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    tiny_special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN))
LLAMA = Family(
    name="llama", config_class=LlamaConfig, caption_end="<|eot_id|>", bos="<|begin_of_text|>", pad="<|end_of_text|>",
    turn="<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    tiny_special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    image_slot="<|reserved_special_token_0|>")
FAMILIES = {f.name: f for f in (OPT, QWEN2, LLAMA)}

# LoRA targets of the other towers (transformers' Blip2 module names): the ViT's fused qkv, attention output and MLP;
# the Q-Former's query/key/value (self- and cross-attention) and every dense output
VISION_LORA_TARGETS = ("qkv", "projection", "fc1", "fc2")
QFORMER_LORA_TARGETS = ("query", "key", "value", "dense")


def family_of(config) -> Family:
    """The family of a Blip2Config (or of a text config)."""
    text = getattr(config, "text_config", config)
    kind = text.model_type if not isinstance(text, dict) else text["model_type"]
    if kind not in FAMILIES:
        raise ValueError(f"language model type {kind!r} has no expblip family; known: {sorted(FAMILIES)}")
    return FAMILIES[kind]
