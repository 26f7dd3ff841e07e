"""Offline tokenizers: trained on the captions for tiny presets, read from a path for real ones.

Nothing here downloads. A tiny tokenizer is a byte-level BPE in its LM family's conventions (expblip.model.family):
OPT's `<pad>` = 1 and `</s>` = 2 as BOS and EOS; Qwen2.5's `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>`;
Llama-3's `<|begin_of_text|>`, `<|end_of_text|>` (pad), header tokens and `<|eot_id|>`. Every tokenizer also holds an
`<image>` token, whose positions BLIP-2 fills with query outputs. Captions end with the family's caption end token
("\\n" for OPT, as the released Exp-BLIP code; the chat end-of-turn token for Qwen2.5 and Llama-3), which is also
the generation end token. A tokenizer's family is read from its vocabulary (family_of_tokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from expblip.model.family import FAMILIES, IMAGE_TOKEN, LLAMA, OPT, QWEN2, Family

SPECIAL_TOKENS = list(OPT.tiny_special_tokens)  # ids 0..4, OPT's order for the first three
CAPTION_END = OPT.caption_end


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 512,
                            family: Family | str = OPT) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on caption text in `family`'s conventions (deterministic for a given corpus order)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.tiny_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    end = family.caption_end if family is OPT else ""  # special end tokens are split off before BPE anyway
    tok.train_from_iterator((c + end for c in captions), trainer=trainer)
    return wrap(tok, family)


def wrap(tok: Tokenizer, family: Family | None = None) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with its family's special-token roles (the family read from the vocabulary
    when not given); a Llama-3 vocabulary's first reserved token becomes <image> (see with_image_token)."""
    family = family or _family_of_vocab(tok.get_vocab(with_added_tokens=True))
    tok = _rename_slot(tok, family)
    eos = family.caption_end if family is not OPT else "</s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=eos,
        pad_token=family.pad,
        unk_token="<unk>" if family is OPT else None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def _rename_slot(tok: Tokenizer, family: Family) -> Tokenizer:
    """The tokenizer with family.image_slot renamed <image> (same id), when it has no <image> yet."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if IMAGE_TOKEN in vocab or not family.image_slot or family.image_slot not in vocab:
        return tok
    data = json.loads(tok.to_str())
    for added in data.get("added_tokens", []):
        if added["content"] == family.image_slot:
            added["content"] = IMAGE_TOKEN
    model_vocab = data.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict) and family.image_slot in model_vocab:
        model_vocab[IMAGE_TOKEN] = model_vocab.pop(family.image_slot)
    return Tokenizer.from_str(json.dumps(data))


def with_image_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tok` holding <image>: a Llama-3 tokenizer's first reserved special token is renamed (its vocabulary of
    128,256 tokens fills the LM's embedding: a new token would need a row the pretrained weights lack); any other
    gets <image> as a new special token (OPT's and Qwen2.5's embeddings have spare rows)."""
    if IMAGE_TOKEN in tok.get_vocab():
        return tok
    family = family_of_tokenizer(tok)
    if family.image_slot and family.image_slot in tok.get_vocab() and isinstance(tok, PreTrainedTokenizerFast):
        renamed = PreTrainedTokenizerFast(
            tokenizer_object=_rename_slot(tok.backend_tokenizer, family), bos_token=tok.bos_token,
            eos_token=tok.eos_token, pad_token=tok.pad_token or family.pad, unk_token=tok.unk_token,
            extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right")
        return renamed
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Read a tokenizer saved with `save_pretrained` from a local directory (never from a hub), with <image> and a
    pad token (a Llama-3 tokenizer has none: its family's is set)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; set model.tokenizer to a local directory holding "
            "tokenizer.json (e.g. a copy of facebook/opt-6.7b's tokenizer), or use a tiny preset which trains one"
        )
    tok = with_image_token(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    if tok.pad_token is None:
        tok.pad_token = family_of_tokenizer(tok).pad
    return tok


def _family_of_vocab(vocab: dict) -> Family:
    if "<|im_end|>" in vocab:
        return QWEN2
    if "<|eot_id|>" in vocab:
        return LLAMA
    return OPT


def family_of_tokenizer(tok: PreTrainedTokenizerBase) -> Family:
    """The LM family whose conventions a tokenizer follows: Qwen2.5 (<|im_end|>), Llama-3 (<|eot_id|>), else OPT."""
    return _family_of_vocab(tok.get_vocab())


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def bos_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """The token between the image tokens and the prompt: [BOS] for OPT and Llama-3, [] for Qwen2.5."""
    bos = family_of_tokenizer(tok).bos
    return [tok.convert_tokens_to_ids(bos)] if bos else []


def caption_end_id(tok: PreTrainedTokenizerBase) -> int:
    """Id of the single token that ends every caption (OPT: "\\n", 50118; Qwen2.5: <|im_end|>; Llama-3: <|eot_id|>)."""
    end = family_of_tokenizer(tok).caption_end
    ids = tok(end, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the caption end {end!r} into {ids}; it must be one token")
    return ids[0]
