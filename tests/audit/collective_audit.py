"""An audit of the collectives expblip issues, for a real multi-rank run on CPU ranks.

On a GPU node the default process group is NCCL, which has no CPU backend: a CPU tensor handed to it raises, and a
pickled object or a barrier on it uses whatever CUDA device is current. CPU ranks run gloo, where all of that works,
so a CPU run alone can never show the fault. The audit *declares* the default group CUDA-only, as it is on a GPU
node, and records every collective whose caller is expblip's own code (the loop, held-out evaluation, checkpoints;
DeepSpeed's internal collectives run on the engine's device by construction and are not ours to audit):

- a tensor collective on a group declared CUDA-only whose tensor is not on a CUDA device;
- an object collective or a barrier on a group declared CUDA-only (they travel through the current CUDA device:
  expblip routes them through its gloo host group instead).

Collectives of `expblip.model` (stage 1's feature gather) take the model's activations, which live on the engine's
device by construction, and are left out, like DeepSpeed's.

Installed by tests/audit/sitecustomize.py in every rank process when EXPBLIP_AUDIT_COLLECTIVES names a directory;
each rank appends its records to DIR/rank{R}.jsonl: {"op", "group", "device", "caller", "violation"}.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading

TENSOR_OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
              "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all_single", "send", "recv")
OBJECT_OPS = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "barrier")
_SKIPPED = ("torch", "deepspeed", "collective_audit", "expblip.model")
_inside = threading.local()


def cuda_only(dist, group) -> bool:
    """Whether `group` is declared CUDA-only: the default group (NCCL on a GPU node), or any NCCL group."""
    if group is None or group is dist.GroupMember.WORLD:
        return True
    return dist.get_backend(group) == "nccl"


def _caller() -> str | None:
    """'module:line' of the first frame outside torch, DeepSpeed, this audit and expblip.train.comm (whose helpers
    only route a call to its group), when it is expblip's; else None."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "expblip.train.comm" and frame.f_back is not None:
            frame = frame.f_back
            continue
        if not module.startswith(_SKIPPED):
            return f"{module}:{frame.f_lineno}" if module.startswith("expblip") else None
        if module.startswith(("deepspeed", "expblip.model")):
            return None  # DeepSpeed's own collective, or the model's: on the engine's device by construction
        frame = frame.f_back
    return None


def _tensor(args, kwargs):
    for value in (*args, *kwargs.values()):
        if hasattr(value, "device"):
            return value
        if isinstance(value, list | tuple) and value and hasattr(value[0], "device"):
            return value[0]
    return None


def check(dist, op: str, args: tuple, kwargs: dict) -> dict | None:
    """The record of one collective, or None when it is not expblip's."""
    caller = _caller()
    if caller is None:
        return None
    group = kwargs.get("group")
    declared = cuda_only(dist, group)
    record = {"op": op, "group": "cuda-only" if declared else dist.get_backend(group), "caller": caller}
    if op in OBJECT_OPS:
        record["device"] = None
        record["violation"] = declared
    else:
        tensor = _tensor(args, kwargs)
        record["device"] = str(tensor.device) if tensor is not None else None
        record["violation"] = declared and (tensor is None or tensor.device.type != "cuda")
    return record


def install(directory: str, dist=None) -> None:
    """Wrap torch.distributed's collectives; records go to `directory`/rank{R}.jsonl."""
    import torch.distributed

    dist = dist or torch.distributed
    os.makedirs(directory, exist_ok=True)

    def wrap(op: str, original):
        @functools.wraps(original)
        def audited(*args, **kwargs):
            if getattr(_inside, "depth", 0) == 0:  # an object collective's inner tensor ops are its own business
                record = check(dist, op, args, kwargs)
                if record is not None:
                    rank = dist.get_rank() if dist.is_initialized() else 0
                    with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")
            _inside.depth = getattr(_inside, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                _inside.depth -= 1

        return audited

    for op in (*TENSOR_OPS, *OBJECT_OPS):
        if hasattr(dist, op) and not getattr(getattr(dist, op), "_audited", False):
            wrapped = wrap(op, getattr(dist, op))
            wrapped._audited = True
            setattr(dist, op, wrapped)


def read(directory: str) -> list[dict]:
    """Every rank's records."""
    out = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name)) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out
