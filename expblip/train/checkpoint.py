"""Checkpoints: DeepSpeed shards + per-rank loader cursor and RNG + resolved config; resume; consolidation.

Layout of a run directory:
    run_dir/config.yaml                     resolved config of the run
    run_dir/checkpoints/latest              DeepSpeed's pointer to the newest tag
    run_dir/checkpoints/step00000100/       DeepSpeed shards (+ client_state: step, MLflow run id)
        rank0.pt, rank1.pt ...              loader cursor and RNG state of each rank
        config.yaml, ds_config.json         what produced it
    run_dir/export/                         HF-format model (expblip.model.weights.export_hf)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from expblip.train.engine import gathered


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint (DeepSpeed writes `latest` after all shards)."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoint_root(run_dir) / tag).is_dir() else None


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_state(cursor_state: dict) -> dict:
    """What each rank saves besides DeepSpeed's shards: its loader position and RNG."""
    return {"cursor": cursor_state, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def save(engine, run_dir: str | Path, step: int, client_state: dict, cursor_state: dict, extra_files: dict) -> Path:
    """Collective: every rank writes its shards and state; rank 0 writes `extra_files` (name -> text)."""
    root, tag = checkpoint_root(run_dir), tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    rank = dist.get_rank()
    torch.save(rank_state(cursor_state), root / tag / f"rank{rank}.pt")
    if rank == 0:
        for name, text in extra_files.items():
            (root / tag / name).write_text(text)
    dist.barrier()
    return root / tag


def load(engine, run_dir: str | Path, tag: str) -> tuple[dict, dict | None]:
    """Restore engine state (weights, optimiser, schedule, step); return (client_state, this rank's cursor)."""
    root = checkpoint_root(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}; delete it to resume from an older one")
    state_file = root / tag / f"rank{dist.get_rank()}.pt"
    if not state_file.is_file():  # written by another world size: the loader restarts its epoch
        return client_state, None
    state = torch.load(state_file, weights_only=True)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    return client_state, state["cursor"]


def _as_tuple(obj):
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def prune(run_dir: str | Path, keep: int) -> None:
    """Rank 0: delete all but the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    tags = sorted(p for p in checkpoint_root(run_dir).glob("step*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def consolidated_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Full weights on rank 0 (an empty dict elsewhere), gathering one ZeRO-3 parameter at a time."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        state.update({name: buf.detach().cpu().clone() for name, buf in model.named_buffers()})
    return state


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], rank: int) -> dict[str, list[str]]:
    """Copy `state` (held by rank 0, or every rank) into a possibly partitioned model; returns a key report."""
    own = dict(model.named_parameters())
    report = {"missing": sorted(set(own) - set(state)), "unexpected": sorted(set(state) - set(own))}
    for name, param in own.items():
        if name not in state:
            continue
        with torch.no_grad(), _gathered_for_write(param):
            if rank == 0 or not hasattr(param, "ds_id"):
                param.copy_(state[name].to(param.dtype))
    return report


def _gathered_for_write(param):
    import deepspeed

    if hasattr(param, "ds_id"):
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    from contextlib import nullcontext

    return nullcontext()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
