"""Offline tokenizers: trained on the captions for tiny presets, read from a local path for real ones.

Nothing here downloads. The tiny tokenizer is a byte-level BPE in OPT's conventions: `<pad>` = 1,
`</s>` = 2 as both BOS and EOS, plus an `<image>` token whose positions BLIP-2 fills with query outputs.
Captions end with "\\n", which is also the generation end token (as the released Exp-BLIP code).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN]  # ids 0..4, OPT's order for the first three
CAPTION_END = "\n"


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on caption text (deterministic for a given corpus order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((c + CAPTION_END for c in captions), trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with OPT's special-token roles."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Read a tokenizer saved with `save_pretrained` from a local directory (never from a hub)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; set model.tokenizer to a local directory holding "
            "tokenizer.json (e.g. a copy of facebook/opt-6.7b's tokenizer), or use the tiny preset which trains one"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def caption_end_id(tok: PreTrainedTokenizerBase) -> int:
    """Id of the single token for "\\n" that ends every caption (OPT: 50118)."""
    ids = tok(CAPTION_END, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the caption end {CAPTION_END!r} into {ids}; it must be one token")
    return ids[0]
