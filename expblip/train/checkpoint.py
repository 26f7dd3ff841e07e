"""Checkpoints: DeepSpeed shards + per-rank loader cursor and RNG + resolved config; resume; consolidation.

Layout of a run directory:
    run_dir/config.yaml                     resolved config of the run
    run_dir/checkpoints/latest              pointer to the newest complete tag (replaced atomically)
    run_dir/checkpoints/step00000100/       DeepSpeed shards (+ client_state: step, MLflow run id, world_size)
        rank0.pt, rank1.pt ...              data cursor (the global position, the same on every rank) and RNG state
        elastic.pt                          world-size-free state (rank 0): see save_elastic
        config.yaml, ds_config.json         what produced it
        complete.json                       written last, once every rank's files are on disk
    run_dir/export/                         HF-format model (expblip.model.weights.export_hf)

A checkpoint counts only with its complete.json: a process killed while writing one leaves a directory without it,
which a resume passes over (the newest complete tag wins, whatever `latest` says) and the next save of that step
clears first. `latest` is written after complete.json, through a temporary file and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from expblip.train import comm
from expblip.train.engine import gathered


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


COMPLETE = "complete.json"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def latest_tag(run_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint (one with complete.json); checkpoints of older versions, which had no
    marker, count when `latest` points at them."""
    root = checkpoint_root(run_dir)
    complete = sorted(p.name for p in root.glob("step*") if is_complete(p))
    if complete:
        return complete[-1]
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (root / tag).is_dir() else None


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_state(cursor_state: dict) -> dict:
    """What each rank saves besides DeepSpeed's shards: its loader position and RNG (the CUDA generator of its
    device too, where there is one: dropout on a GPU draws from it)."""
    state = {"cursor": cursor_state, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's, bound by comm.bind_device
    return state


def restore_rng(state: dict) -> None:
    """The RNG states rank_state saved (a checkpoint written without CUDA restores the CPU ones)."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def save(engine, run_dir: str | Path, step: int, client_state: dict, cursor_state: dict, extra_files: dict,
         frozen_source: str = "") -> Path:
    """Collective: every rank writes its shards and state; rank 0 writes `extra_files` (name -> text).
    `frozen_source` (model.weights): where the frozen towers can be re-read, so neither DeepSpeed's shards nor
    elastic.pt repeat them.

    Atomic as a whole: rank 0 writes complete.json once every rank has written, then points `latest` at it.
    """
    root, tag = checkpoint_root(run_dir), tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    client_state = {**client_state, "world_size": world, "frozen_from": frozen_source}
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and (root / tag).exists():  # a killed attempt's leftovers
        shutil.rmtree(root / tag, ignore_errors=True)
    comm.barrier()
    save_elastic(engine, root / tag, rank, client_state, frozen_source)
    # frozen towers that model.weights holds are not written again (at paper scale 14 GiB per checkpoint): a resume
    # and an export re-read them there
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=bool(frozen_source))
    torch.save(rank_state(cursor_state), root / tag / f"rank{rank}.pt")
    if rank == 0:
        for name, text in extra_files.items():
            (root / tag / name).write_text(text)
    comm.barrier()  # every rank's files are written
    if rank == 0:
        _write_atomic(root / tag / COMPLETE, json.dumps({"step": step, "world_size": world,
                                                         "data": cursor_state}, indent=2))
        _write_atomic(root / "latest", tag)
    comm.barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or `text`, never a part of it (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def written_world_size(run_dir: str | Path, tag: str) -> int:
    """The number of ranks that wrote checkpoint `tag` (complete.json says; older checkpoints: one rank{r}.pt each)."""
    marker = checkpoint_root(run_dir) / tag / COMPLETE
    if marker.is_file():
        return int(json.loads(marker.read_text())["world_size"])
    return len(list((checkpoint_root(run_dir) / tag).glob("rank*.pt")))


def load(engine, run_dir: str | Path, tag: str, frozen_from: str = "") -> tuple[dict, dict | None]:
    """Same world size: restore engine state (weights, optimiser, schedule, step) exactly with DeepSpeed's loader;
    return (client_state, this rank's cursor). `frozen_from`: the frozen towers are already loaded from there, and a
    checkpoint that left them out (save) is loaded without them."""
    root = checkpoint_root(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not frozen_from)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}; delete it to resume from an older one")
    state_file = root / tag / f"rank{dist.get_rank()}.pt"
    state = torch.load(state_file, weights_only=True)
    restore_rng(state)
    return client_state, state["cursor"]


def _as_tuple(obj):
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def prune(run_dir: str | Path, keep: int, step: int, protect: int = -1) -> None:
    """Rank 0: delete all but the newest `keep` complete checkpoints (0 keeps all) and the one of step `protect`
    (train.keep=best: the selected step), and incomplete ones older than `step` (left by killed attempts; newer
    ones are cleared when their step is saved again)."""
    tags = sorted(p for p in checkpoint_root(run_dir).glob("step*") if p.is_dir())
    complete = [p for p in tags if is_complete(p) and (protect < 0 or p.name != tag_for(protect))]
    stale = [p for p in tags if not is_complete(p) and p.name < tag_for(step)]
    for old in (complete[:-keep] if keep > 0 else []) + stale:
        shutil.rmtree(old, ignore_errors=True)


def trainable_digest(engine, rank: int) -> str:
    """Collective: sha256 over the trainable parameters' full fp32 master weights, in name order ('' off rank 0).
    Equal digests at a save and at a resume show that the resume continues from the same trainable weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    digest = hashlib.sha256()
    for name, param in sorted(engine.module.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            if rank == 0:
                digest.update(name.encode())
                digest.update(memoryview(full.detach().to("cpu", torch.float32).contiguous().view(-1).numpy()))
    return digest.hexdigest() if rank == 0 else ""


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
    """Collective: copy `state`, held by rank 0 only (other ranks pass {}), into a possibly partitioned model.

    Only the key names travel to the other ranks; each tensor goes from rank 0 into the partitions (ZeRO-3) or is
    broadcast (replicated parameters). Returns the key report, correct on rank 0 (empty lists elsewhere).
    """
    own = dict(model.named_parameters())
    given = set(comm.broadcast_object(sorted(state) if rank == 0 else None))
    report = {"missing": sorted(set(own) - given), "unexpected": sorted(given - set(own))} if rank == 0 else \
        {"missing": [], "unexpected": []}
    for name, param in own.items():
        if name not in given:
            continue
        with torch.no_grad(), _gathered_for_write(param):
            if rank == 0:
                param.copy_(state[name].to(param.dtype))
            if not hasattr(param, "ds_id"):  # replicated: every rank needs the values
                comm.broadcast(param.data, src=0)  # on the group of its device (the host group before initialize)
    return report


def _gathered_for_write(param):
    import deepspeed

    if hasattr(param, "ds_id"):
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    from contextlib import nullcontext

    return nullcontext()


# ---------------------------------------------------------------- elastic state: resume at another world size
#
# DeepSpeed's ZeRO-3 shards (optimizer partitions, per-rank files) only load at the world size that wrote them, and its
# universal-checkpoint conversion (deepspeed/checkpoint/ds_to_universal.py, `checkpoint.load_universal`) restores only
# the optimiser's parameter groups under ZeRO-3: frozen towers are not written back, and it needs an offline
# conversion pass. So rank 0 also writes elastic.pt, keyed by parameter name and free of the world size.

ELASTIC = "elastic.pt"
_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count


def _inner_optimizer(engine):
    """The torch optimiser under DeepSpeed's ZeRO wrapper (whose state holds the flat fp32 partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def save_elastic(engine, directory: Path, rank: int, client_state: dict, frozen_source: str = "") -> None:
    """Collective: rank 0 writes `directory`/elastic.pt.

    Frozen parameters: weights in their own dtype, unless `frozen_source` names the initial weights they were
    loaded from (frozen weights never change: a resume re-reads them there, and a 7B tower is not rewritten with
    every checkpoint); elastic.pt then records the source under "frozen_from". Trainable ones: fp32 master weights and Adam moments, each
    assembled from its partitions by DeepSpeed's safe_get_full_* (one parameter at a time). Also the optimiser's step
    count and hyper-parameters, the lr schedule, the engine counters and `client_state`. Rank 0 holds the whole state
    in host memory while writing: fine for BLIP-2's trainable Q-Former; frozen multi-billion towers cost their size.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _relink_optimizer_state(engine)
    state: dict = {"weights": {}, "fp32": {}, **{k: {} for k in _MOMENTS}}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            full = {"fp32": safe_get_full_fp32_param(param),
                    **{k: safe_get_full_optimizer_state(param, k) for k in _MOMENTS}}
            if rank == 0:
                for key, value in full.items():
                    state[key][name] = value.detach().to("cpu", torch.float32, copy=True).reshape(_full_shape(param))
        elif not frozen_source:
            with gathered([param]):
                if rank == 0:
                    state["weights"][name] = param.detach().to("cpu", copy=True)
    if rank != 0:
        return
    state["frozen_from"] = frozen_source
    steps = [s["step"] for s in _inner_optimizer(engine).state.values() if "step" in s]
    state.update(
        world_size=dist.get_world_size(), client_state=client_state, trainable=sorted(state["fp32"]),
        optimizer_step=float(steps[0]) if steps else 0.0,
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
        lr_scheduler=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        counters={k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
    )
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / ELASTIC)


def _relink_optimizer_state(engine) -> None:
    """ZeRO-1/2 (replicated towers): point every parameter's optimiser-state fragments at the Adam state again.

    Workaround for DeepSpeed 0.19.8: DeepSpeedZeroOptimizer links them lazily right after the *first* param group's
    first step (_optimizer_step -> _lazy_init_hp_params_optimizer_state), when the other groups' Adam state does not
    exist yet, and never again; with our two groups (decayed, not decayed) the second group's parameters then have
    no exp_avg and safe_get_full_optimizer_state raises "exp_avg not found in optimizer state fragment".
    """
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and not hasattr(zero, "fp32_partitioned_groups_flat"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _full_shape(param) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape  # ZeRO-3 params are empty outside forward


def read_elastic(run_dir: str | Path, tag: str, rank: int) -> dict:
    """Rank 0: the elastic state of checkpoint `tag`; {} on the other ranks (they receive it piece by piece)."""
    path = checkpoint_root(run_dir) / tag / ELASTIC
    if not path.is_file():  # every rank sees the same directory, so every rank raises
        raise RuntimeError(f"checkpoint {path.parent} has no {ELASTIC} (written before resuming at another world size "
                           "was supported): resume it with the number of ranks that wrote it")
    # memory-mapped: a 7.7 B run's trainable state (1.3 GB) is paged in as each tensor is scattered, and its clean
    # file pages can be dropped again under memory pressure
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True) if rank == 0 else {}


def elastic_weights(elastic: dict) -> dict[str, torch.Tensor]:
    """Rank 0: every parameter's weights (frozen ones as saved, trainable ones from their fp32 masters)."""
    return {**elastic.get("weights", {}), **elastic.get("fp32", {})}


def restore_elastic(engine, elastic: dict, rank: int) -> dict:
    """Collective, after deepspeed.initialize: scatter fp32 masters and Adam moments into this world's partitions,
    restore step count, schedule and counters. Returns the checkpoint's client_state.

    The module weights must already hold elastic_weights() (load_weights_into before deepspeed.initialize).
    """
    meta = comm.broadcast_object({k: v for k, v in elastic.items() if k not in ("weights", "fp32", *_MOMENTS)}
                                 if rank == 0 else None)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    differ = sorted({n for n, _ in trainable} ^ set(meta["trainable"]))
    if differ:
        raise RuntimeError(f"the trainable parameters differ from those of the checkpoint ({differ[:8]}): resume with "
                           "the checkpoint's model.freeze_* and train.stage")
    _create_adam_state(engine)
    _relink_optimizer_state(engine)
    for name, param in trainable:
        shape = _full_shape(param)
        for key in ("fp32", *_MOMENTS):
            value = elastic[key][name].contiguous() if rank == 0 else torch.empty(shape, dtype=torch.float32)
            comm.broadcast(value, src=0)  # read from rank 0's file: a host-side exchange; each rank keeps its slice
            _set_fp32_state(param, value, None if key == "fp32" else key)
    _restore_schedule(engine, meta)
    return meta["client_state"]


def _set_fp32_state(param, value: torch.Tensor, key: str | None) -> None:
    """Write the full fp32 `value` of `param`'s master weight (key None) or Adam moment `key` into this rank's slice.

    ZeRO-3 goes through the local API with our own slicing: deepspeed 0.19.8's set_full_hp_param slices the unpadded
    value, so it fails on the last rank whenever numel % world != 0 ("start + length exceeds dimension size").
    """
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if not hasattr(param, "ds_id"):  # ZeRO-1/2: the fragment API slices correctly
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    size = param.ds_tensor.numel()  # ceil(numel / world): the last rank's slice ends in padding
    padded = torch.zeros(size * dist.get_world_size(group=param.ds_process_group), dtype=torch.float32)
    padded[: value.numel()] = value.flatten()
    mine = padded.narrow(0, size * dist.get_rank(group=param.ds_process_group), size)
    if key is None:
        safe_set_local_fp32_param(param, mine)
    else:
        safe_set_local_optimizer_state(param, mine, key)


def _create_adam_state(engine) -> None:
    """torch's AdamW creates its state at its first step; the restore writes into that state before the first step.

    The state is keyed by DeepSpeed's flat fp32 partitions (one per sub-group under ZeRO-3, per group under ZeRO-1/2).
    """
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    for flat in flats:
        state = _inner_optimizer(engine).state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in _MOMENTS:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))


def _restore_schedule(engine, meta: dict) -> None:
    """Adam's step count, the param groups' hyper-parameters (lr included), the lr schedule, engine counters."""
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(meta["optimizer_step"], dtype=old.dtype) if torch.is_tensor(old) \
                else type(old)(meta["optimizer_step"])
    for group, saved in zip(engine.optimizer.param_groups, meta["param_groups"], strict=True):
        group.update(saved)
    if meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for key, value in meta["counters"].items():
        setattr(engine, key, value)


def data_cursor(run_dir: str | Path, tag: str) -> dict:
    """The data cursor checkpoint `tag` saved: the global position, the same for every rank and world size."""
    state = torch.load(checkpoint_root(run_dir) / tag / "rank0.pt", weights_only=True)
    return state["cursor"]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
