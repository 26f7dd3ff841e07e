"""LoRA adapters (peft) on BLIP-2's towers, and folding them back into plain weights.

    settings = LoraSettings(towers=("lm",), r=16, alpha=32)      # model.lora.*
    add_lora(blip2, settings, family)                            # peft LoRA layers injected in place
    merged = merge_adapters(state, settings.scale)               # {transformers name: tensor or lazy merge}

peft's `inject_adapter_in_model` replaces each targeted nn.Linear by a `lora.Linear` holding the original layer as
`base_layer` and the adapters `lora_A.default` [r, in] and `lora_B.default` [out, r] (B starts at zero, so a fresh
adapter changes nothing). Parameter names gain `.base_layer` and `.lora_A.default` / `.lora_B.default`; this module
maps them back: `base_name` gives the transformers name of a base parameter (what model.weights, frozen-tower
fingerprints and HF exports use), `merge_adapters` folds W + (alpha / r) * B @ A into one weight per adapted layer,
so a merged export is a plain Blip2ForConditionalGeneration that stock transformers (and vLLM) load.

The base weights of an adapted tower stay frozen; only adapters (and the Q-Former / projection, as in BLIP-2's stage
2) train. Nothing here imports Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from expblip.model.family import QFORMER_LORA_TARGETS, VISION_LORA_TARGETS, Family

LoraTower = Literal["lm", "vision", "qformer"]
TOWER_MODULES = {"lm": "language_model", "vision": "vision_model", "qformer": "qformer"}
ADAPTER = "default"  # peft's adapter name


@dataclass
class LoraSettings:
    """LoRA on frozen towers (peft): which towers, which of their linear layers, rank, scale and dropout."""

    towers: tuple[LoraTower, ...] = ()  # towers that get adapters (lm, vision, qformer); () = no LoRA
    # module-name suffixes (peft target_modules), applied in every listed tower; () = each tower's defaults: the LM
    # family's attention and MLP projections, the ViT's qkv/projection/fc1/fc2, the Q-Former's query/key/value/dense
    targets: tuple[str, ...] = ()
    r: int = 16  # rank
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapters' input

    def __post_init__(self) -> None:
        unknown = sorted(set(self.towers) - set(TOWER_MODULES))
        if unknown:
            raise ValueError(f"model.lora.towers {unknown}: choose among {sorted(TOWER_MODULES)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("model.lora.r must be >= 1, model.lora.alpha > 0 and model.lora.dropout in [0, 1)")

    @property
    def enabled(self) -> bool:
        return bool(self.towers)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def targets_for(self, tower: str, family: Family) -> list[str]:
        defaults = {"lm": family.lora_targets, "vision": VISION_LORA_TARGETS, "qformer": QFORMER_LORA_TARGETS}
        return list(self.targets or defaults[tower])


def add_lora(blip2: nn.Module, settings: LoraSettings, family: Family) -> None:
    """Inject LoRA layers into each tower of `settings.towers` (in place). Call outside transformers'
    no_init_weights (peft initialises A with kaiming-uniform and B with zeros through torch.nn.init)."""
    from peft import LoraConfig, inject_adapter_in_model

    for tower in settings.towers:
        module = getattr(blip2, TOWER_MODULES[tower])
        targets = settings.targets_for(tower, family)
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=targets, bias="none")
        try:
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"model.lora.targets {targets} match no linear layer of the {tower} tower "
                             f"({type(module).__name__}): {err}") from err


def is_adapter(name: str) -> bool:
    """A LoRA parameter (or its key in a state dict)."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The transformers name of a parameter of an adapted layer ('...q_proj.base_layer.weight' -> '...q_proj.weight')."""
    return name.replace(".base_layer.", ".")


def adapted_layers(names) -> list[str]:
    """Prefixes ('...q_proj') of the layers that hold adapters, in first-seen order."""
    return list(dict.fromkeys(n.split(".lora_A.")[0] for n in names if ".lora_A." in n))


class MergedWeight:
    """W + scale * B @ A of one adapted layer, computed when asked (`.contiguous()`), in W's dtype (fp32 math).

    Its parts may be lazy (anything with `.contiguous()`: a streamed tower tensor, a ZeRO-3 gather; a gather returns
    None off rank 0, and so does the merge)."""

    def __init__(self, base, a, b, scale: float):
        self.base, self.a, self.b, self.scale = base, a, b, scale
        self.shape, self.dtype = base.shape, base.dtype

    def contiguous(self) -> torch.Tensor | None:
        w, a, b = (_value(t) for t in (self.base, self.a, self.b))  # always all three: gathers are collectives
        if w is None:
            return None
        delta = self.scale * (b.to(torch.float32) @ a.to(torch.float32))  # [out, r] @ [r, in]
        return (w.to(torch.float32) + delta).to(w.dtype).contiguous()


def _value(t) -> torch.Tensor | None:
    return t if isinstance(t, torch.Tensor) else t.contiguous()


def merge_adapters(state: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """A state under transformers' names with every adapter folded into its layer's weight (lazily: MergedWeight).

    `state` may name base weights either way ('...q_proj.base_layer.weight' or '...q_proj.weight'); the adapters'
    own keys are left out of the result. Order follows `state` (its first key of each layer)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not is_adapter(key):
            out[base_name(key)] = value
    for prefix in adapted_layers(state):
        weight = f"{prefix}.weight"
        if weight not in out:
            raise KeyError(f"the adapters of {prefix} have no base weight {weight} in the state")
        a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
        out[weight] = MergedWeight(out[weight], a, b, scale)
    return out


def count_adapter_params(model: nn.Module) -> int:
    """Parameters of the LoRA adapters in `model`."""
    return sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
               for n, p in model.named_parameters() if is_adapter(n))
