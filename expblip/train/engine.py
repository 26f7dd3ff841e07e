"""DeepSpeed: process group, config resolution, partitioned construction, deepspeed.initialize.

The shipped ds_configs/*.json hold ZeRO and precision policy only; every number that our config owns
(micro-batch, accumulation, clipping) is written into the DeepSpeed config here, at start-up.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from expblip.config import COLLECTIVE_TIMEOUT_S, Config, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
_FILLED_BY_US = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler")


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group: deepspeed launcher, torchrun, Ray Train, or a lone `python` process."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python launch/finetune.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _skip_cpu_shm_all_reduce()
    # explicit: a rank whose storage is out makes the others wait in a collective for up to data.max_outage_s
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _skip_cpu_shm_all_reduce() -> None:
    """On the CPU accelerator DeepSpeed 0.19 JIT-builds a shared-memory all-reduce op in init_distributed.

    Only tensor-parallel inference (inference_all_reduce) uses it; training collectives go through gloo. Building it
    costs a g++ run the first time; a build that is killed leaves ~/.cache/torch_extensions/*/deepspeed_shm_comm/lock
    behind and every later run waits on that lock forever; and every run leaves a 66 MiB
    /dev/shm/deepspeed_allreduce_buffer_* file per rank that nothing removes. So training does not build it.
    """
    # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` attribute is the torch package
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ds_config(path: str) -> dict:
    """Read a policy JSON; numbers that our config owns must not be set there (one source of truth)."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (REPO_ROOT / file).is_file():
        file = REPO_ROOT / file  # the shipped policies, from any working directory
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config {path} (train.ds_config / --deepspeed) does not exist; "
                          "use one of ds_configs/zero3.json, zero2.json, zero3_offload.json")
    try:
        policy = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    owned = [k for k in _FILLED_BY_US if k in policy]
    if owned:
        raise ConfigError(f"DeepSpeed config {path} sets {owned}; these come from our config "
                          "(data.train.batch_size, optim.grad_accum, optim.grad_clip, optim.*): remove them")
    return policy


def resolve_ds_config(cfg: Config, world_size: int) -> dict:
    """The policy JSON completed with batch sizes and clipping from our config."""
    ds = load_ds_config(cfg.train.ds_config)
    micro = cfg.data.train.batch_size
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=cfg.optim.grad_accum,
              train_batch_size=micro * cfg.optim.grad_accum * world_size, gradient_clipping=cfg.optim.grad_clip)
    if not torch.cuda.is_available():
        ds.get("zero_optimization", {}).pop("offload_param", None)  # pinned CPU offload needs a GPU
        ds.get("zero_optimization", {}).pop("offload_optimizer", None)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_partitioned(ds_config: dict, build: Callable[[], nn.Module]) -> nn.Module:
    """Run `build` so that, under ZeRO-3, each parameter is partitioned as it is created.

    `deepspeed.zero.Init` around Blip2ForConditionalGeneration fails (HF's weight init indexes a partitioned
    embedding row); keeping an HfDeepSpeedConfig alive makes transformers' own construction partition instead.
    """
    if zero_stage(ds_config) != 3:
        return build()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers reads it through a weak reference
    try:
        return build()
    finally:
        unset_hf_deepspeed_config()  # later rank-0-only constructions must not become collectives


def initialize(model: nn.Module, optimizer, scheduler, ds_config: dict):
    """deepspeed.initialize with our optimiser and schedule; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def gathered(params) -> object:
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (a no-op otherwise)."""
    import deepspeed

    params = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else nullcontext()


def register_external(module: nn.Module, param: nn.Parameter) -> None:
    """Tell ZeRO-3 that `module`'s forward reads `param`, which another module owns (a no-op without DeepSpeed)."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, param)


def resident_parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter bytes this rank holds, bytes of the whole model).

    Under ZeRO-3 a rank holds `ds_tensor`, its slice of each parameter: ceil(numel / world) elements, so the padding
    is at most world - 1 elements per parameter. Unpartitioned parameters count whole.
    """
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            size = param.ds_tensor.element_size()
            held += param.ds_tensor.numel() * size
            total += param.ds_numel * size
        else:
            held += param.numel() * param.element_size()
            total += param.numel() * param.element_size()
    return held, total


def cast_partitions(model: nn.Module) -> None:
    """Give each ZeRO-3 partition its parameter's dtype (model.frozen_dtype casts `param.data`, empty under ZeRO-3;
    DeepSpeed gathers in the partition's dtype)."""
    for param in model.parameters():
        if hasattr(param, "ds_tensor") and param.ds_tensor.dtype != param.dtype:
            param.ds_tensor.data = param.ds_tensor.data.to(param.dtype)
