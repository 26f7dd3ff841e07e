"""What every model family's generation takes and gives back: the decoding settings and one caption's outcome.

Family-free on purpose: the evaluator, the server, the pseudo-captioner and the loop's held-out evaluation build a
GenerationConfig and read Generated tuples without knowing which family (expblip.model.spec) generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass
class GenerationConfig:
    """Decoding: beam search (paper: 5 beams) or nucleus sampling (top_p 0.9)."""

    num_beams: int = 5
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0  # sampling only
    max_new_tokens: int = 60  # the paper's max length 200 is for OPT's tokens; tiny captions are short
    min_new_tokens: int = 3
    repetition_penalty: float = 1.0

    def hf_kwargs(self, eos_token_id: int, pad_token_id: int) -> dict:
        """The keyword arguments of transformers' generate() for these settings."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      repetition_penalty=self.repetition_penalty)
        if self.sample:
            kwargs.update(do_sample=True, top_p=self.top_p, temperature=self.temperature, num_beams=1)
        else:
            kwargs.update(do_sample=False, num_beams=self.num_beams)
        return kwargs


class Generated(NamedTuple):
    """One caption and how it ended: ``tokens`` generated (the end token included), ``stopped`` at the end token
    rather than at max_new_tokens."""

    text: str
    tokens: int
    stopped: bool


def decode_new(tokenizer, new, end: int, with_lengths: bool) -> list[str] | list[Generated]:
    """Captions from generate()'s new tokens [B, N] (the prompt cut off): stripped strings, or Generated tuples."""
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    if not with_lengths:
        return texts
    out = []
    for text, row in zip(texts, new.tolist(), strict=True):
        stopped = end in row
        length = row.index(end) + 1 if stopped else len(row) - _trailing(row, tokenizer.pad_token_id)
        out.append(Generated(text, length, stopped))
    return out


def _trailing(row: list[int], value: int) -> int:
    """How many times ``value`` ends ``row`` (the padding of a finished sequence)."""
    n = 0
    while n < len(row) and row[-1 - n] == value:
        n += 1
    return n
