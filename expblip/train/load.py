"""Initial weights (`model.weights`) into the training unit, streamed: every rank reads only what it holds.

    source = open_weights(cfg.model.weights)          # headers only (expblip.model.weights.WeightSource)
    report = load_initial_weights(unit, source, cfg.model.allow_missing, rank)    # collective

Under ZeRO-3 each rank reads, for every parameter, the flat slice [rank * p, (rank + 1) * p) that its partition
`param.ds_tensor` holds (p = ceil(numel / world)) straight from the safetensors bytes into that partition, a bounded
chunk at a time (expblip.model.tensorio). No rank ever holds a whole tower, and no rank sends another a weight: the
ranks read disjoint byte ranges of the same files. Replicated parameters (ZeRO-2, a world of one) are read whole.

Strict: a parameter that the source lacks, a source tensor that fits nowhere (stage-1 heads a stage-2 model has no
place for are reported, not refused) and a shape mismatch are errors naming the tensors, unless the parameter
matches a `model.allow_missing` glob (`*` within one dotted part, `**` across parts: `itm_head.**`,
`qformer.encoder.layer.*.intermediate.**`). Those start new: the ones inside BLIP-2 are initialised by
transformers' own `_init_weights` (the model was built without initialisation), the stage heads beside it by
their constructors. Each rank checks the same headers; before any rank raises, all ranks exchange their verdicts
(one all_gather), so they fail together instead of one raising while the others wait in a collective.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from expblip.config import ConfigError
from expblip.log import get_logger
from expblip.model.lora import base_name, is_adapter
from expblip.model.spec import hf_attr
from expblip.model.weights import STAGE1_EXTRAS, WeightSource

log = get_logger(__name__)


@dataclass
class Slot:
    """One parameter of the unit and the source keys that may fill it (tied parameters have several names)."""

    names: list[str]  # in the unit, `blip2.` stripped: what model.allow_missing matches and errors name
    keys: list[str]  # in the source
    param: nn.Parameter

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.ds_shape if hasattr(self.param, "ds_shape") else self.param.shape)


@dataclass
class LoadReport:
    """What the source has for the unit (every rank computes the same one)."""

    loaded: list[tuple[Slot, str]] = field(default_factory=list)  # (slot, source key it is read from)
    missing: list[Slot] = field(default_factory=list)  # neither in the source nor allowed to be missing
    allowed: list[Slot] = field(default_factory=list)  # not in the source, matched by model.allow_missing
    unexpected: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # stage-1 heads etc. the unit has no place for
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, source's, model's)

    def problems(self, limit: int = 8) -> str:
        """'' when the source fits; else the offending tensors by kind, named."""
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {', '.join(s.names[0] for s in self.missing[:limit])}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {', '.join(self.unexpected[:limit])}")
        if self.mismatched:
            parts.append(f"wrong shape {len(self.mismatched)}: " + ", ".join(
                f"{k} is {list(a)} in the weights, {list(b)} in the model" for k, a, b in self.mismatched[:limit]))
        return "; ".join(parts)


def allow_pattern(globs: Iterable[str]) -> re.Pattern | None:
    """One regex for model.allow_missing: `*` matches within a dotted part, `**` across parts; whole names only."""
    globs = list(globs)
    if not globs:
        return None
    parts = []
    for glob in globs:
        pieces = [re.escape(p).replace(r"\*", "[^.]*") for p in glob.split("**")]
        parts.append(".*".join(pieces))
    return re.compile("|".join(f"(?:{p})" for p in parts))


def slots(unit: nn.Module) -> list[Slot]:
    """Every parameter once, with all its names: BLIP-2's under transformers' names (a LoRA-adapted layer's
    `base_layer` under its own name), stage heads under the names their weights carry (Stage1Model.source_key: LAVIS
    and Blip2ForImageTextRetrieval names). LoRA adapters are left out: peft initialised them (B = 0), nothing loads
    them."""
    by_id: dict[int, Slot] = {}
    prefix = f"{hf_attr(unit)}."  # where the unit keeps its HF model
    for name, param in unit.named_parameters(remove_duplicate=False):
        if is_adapter(name):
            continue
        plain = base_name(name.removeprefix(prefix))
        key = plain if name.startswith(prefix) else getattr(unit, "source_key", lambda n: n)(name)
        slot = by_id.setdefault(id(param), Slot([], [], param))
        slot.names.append(plain)
        slot.keys.append(key)
    return list(by_id.values())


def plan_load(unit: nn.Module, shapes: dict[str, tuple[int, ...]], allow_missing: Iterable[str] = ()) -> LoadReport:
    """Match the source's tensors (name -> shape) with the unit's parameters."""
    allowed = allow_pattern(allow_missing)
    report, used = LoadReport(), set()
    for slot in slots(unit):
        key = next((k for k in slot.keys if k in shapes), None)
        if key is None:
            ok = allowed is not None and any(allowed.fullmatch(n) for n in slot.names)
            (report.allowed if ok else report.missing).append(slot)
            continue
        used.update(k for k in slot.keys if k in shapes)
        if not _same_shape(shapes[key], slot.shape):
            report.mismatched.append((key, shapes[key], slot.shape))
        else:
            report.loaded.append((slot, key))
    for key in sorted(set(shapes) - used):
        (report.extras if STAGE1_EXTRAS.match(key) else report.unexpected).append(key)
    return report


def _same_shape(theirs: tuple, ours: tuple) -> bool:
    """Exactly equal, or a scalar stored as [1] (LAVIS' ITC temperature is 0-d; a ZeRO-3 parameter cannot be)."""
    theirs, ours = tuple(theirs), tuple(ours)
    return theirs == ours or ({theirs, ours} <= {(), (1,)})


# ---------------------------------------------------------------- the collective load


def load_initial_weights(unit: nn.Module, source: WeightSource, allow_missing: Iterable[str], rank: int) -> LoadReport:
    """Collective: check the source against the unit, initialise the allowed-missing parameters, stream the rest
    into this rank's partitions. Raises ConfigError on every rank when any rank finds a problem."""
    report = None
    try:
        report = plan_load(unit, source.shapes(), allow_missing)
        problem = report.problems()
        error = (f"model.weights {source.where} does not fit the model ({problem}); tensors meant to start new can "
                 "be listed in model.allow_missing (globs: '*' within a dotted part, '**' across)") if problem else ""
    except Exception as err:  # noqa: BLE001 - unreadable headers etc.: reported by every rank below
        error = f"model.weights {source.where}: {type(err).__name__}: {err}"
    _agree(error, rank)
    _init_allowed(unit, report.allowed)
    try:
        for slot, key in report.loaded:
            fill(slot.param, source, key)
        error = ""
    except Exception as err:  # noqa: BLE001
        error = f"reading model.weights {source.where}: {type(err).__name__}: {err}"
    _agree(error, rank)
    _log(report, source)
    return report


def fill(param: nn.Parameter, source: WeightSource, key: str) -> None:
    """Copy `key` into what this rank holds of `param`: its ZeRO-3 partition, or the whole tensor."""
    with torch.no_grad():
        if hasattr(param, "ds_tensor"):
            size = param.ds_tensor.numel()  # ceil(numel / world): the last rank's slice ends in padding
            start = size * dist.get_rank(group=param.ds_process_group)
            stop = min(start + size, param.ds_numel)
            dest = param.ds_tensor.data.view(-1)
            if stop - start < size:
                dest[max(0, stop - start):].zero_()
        else:
            start, stop, dest = 0, param.numel(), param.data.view(-1)
        for offset, chunk in source.read(key, start, stop):
            dest[offset : offset + chunk.numel()].copy_(chunk)


def load_fp32_masters(engine, source: WeightSource, report: LoadReport) -> int:
    """Collective, after deepspeed.initialize, at a fresh start of a 16-bit engine: overwrite the trained parts'
    fp32 master weights with the source's own values. DeepSpeed creates the masters from the 16-bit module weights,
    so an fp32 Q-Former would otherwise start from its bf16 rounding. Returns the number of tensors set."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    count = 0
    for slot, key in report.loaded:
        param = slot.param
        if not param.requires_grad or not source.entries[key].dtype.is_floating_point:
            continue
        if hasattr(param, "ds_tensor"):  # this rank's slice, read in fp32 (the padding stays zero)
            size = param.ds_tensor.numel()
            start = size * dist.get_rank(group=param.ds_process_group)
            local = torch.zeros(size, dtype=torch.float32)
            for offset, chunk in source.read(key, start, min(start + size, param.ds_numel)):
                local[offset : offset + chunk.numel()].copy_(chunk)
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_full_fp32_param(param, source.tensor(key).to(torch.float32).reshape(param.shape))
        count += 1
    return count


def _agree(error: str, rank: int) -> None:
    """Collective: every rank learns every rank's error; all raise together when any has one."""
    errors = [error]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from expblip.train import comm

        errors = comm.all_gather_object(error)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        first = errors[failed[0]]
        raise ConfigError(f"rank {rank}: {first}" + (f" (rank {failed[0]} found it; failing ranks: {failed})"
                                                     if len(errors) > 1 else ""))


def _init_allowed(unit: nn.Module, allowed: list[Slot]) -> None:
    """Initialise the allowed-missing parameters inside BLIP-2 the way transformers does (the model was built with
    initialisation skipped); stage heads beside it were initialised by their constructors. Collective under ZeRO-3."""
    blip2 = getattr(unit, hf_attr(unit), unit)
    wanted = {id(s.param) for s in allowed}
    for module, owner in _owners(blip2):
        params = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if params:
            _init_module(module, owner, list(module.parameters(recurse=False)))


def _owners(blip2: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(module, the innermost transformers PreTrainedModel containing it) for every module of the BLIP-2."""
    from transformers import PreTrainedModel

    out = []

    def walk(module: nn.Module, owner: nn.Module) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        out.append((module, owner))
        for child in module.children():
            walk(child, owner)

    walk(blip2, blip2)
    return out


def _init_module(module: nn.Module, owner, params: list[nn.Parameter]) -> None:
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0), torch.no_grad():
        if rank0 or not partitioned:  # gathered: rank 0 writes and DeepSpeed re-partitions its values
            owner._init_weights(module)


def _log(report: LoadReport, source: WeightSource) -> None:
    allowed = f"; started new (model.allow_missing): {len(report.allowed)}" if report.allowed else ""
    extras = f"; stage-1 extras not used: {len(report.extras)}" if report.extras else ""
    log.info(f"weights {source.where} ({source.kind}): {len(report.loaded)} tensors streamed into this rank's "
             f"partitions{allowed}{extras}")
