"""How every model family builds its transformers model: one attention implementation, and construction without
initialisation for weights that are loaded afterwards."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel

ATTENTION = "sdpa"  # the attention implementation every model expblip builds uses (from_config)


def from_config(cls: type[PreTrainedModel], config: PretrainedConfig, init: bool = True,
                dtype: torch.dtype | None = None) -> PreTrainedModel:
    """cls._from_config, optionally without initialisation and in `dtype`.

    init=False skips every initialiser (transformers' no_init_weights: parameters are allocated, never written),
    so a 7.7 B model costs no random draws and, until loaded, no touched memory; a tied LM head is tied here,
    since no_init_weights also skips the tying that init_weights does.
    """
    from transformers.initialization import no_init_weights

    # attention pinned, not left to the library's default of the day: PyTorch's fused SDPA kernels (flash /
    # memory-efficient on GPUs), in every tower
    kwargs = {"attn_implementation": ATTENTION, **({"dtype": dtype} if dtype is not None else {})}
    if init:
        return cls._from_config(config, **kwargs)
    with no_init_weights():
        model = cls._from_config(config, **kwargs)
    model.tie_weights()
    return model
