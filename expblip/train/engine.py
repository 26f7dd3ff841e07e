"""DeepSpeed: config resolution (the GPU policy, adapted on CPU ranks), partitioned construction, deepspeed.initialize.

The shipped ds_configs/*.json hold ZeRO and precision policy only; every number that our config owns
(micro-batch, accumulation, clipping) is written into the DeepSpeed config here, at start-up.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from expblip.config import Config, ConfigError
from expblip.log import get_logger
from expblip.model.spec import spec_for_preset

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_FILLED_BY_US = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler")


def skip_cpu_shm_all_reduce() -> None:
    """On the CPU accelerator DeepSpeed 0.19 JIT-builds a shared-memory all-reduce op in init_distributed.

    Only tensor-parallel inference (inference_all_reduce) uses it; training collectives go through gloo. Building it
    costs a g++ run the first time; a build that is killed leaves ~/.cache/torch_extensions/*/deepspeed_shm_comm/lock
    behind and every later run waits on that lock forever; and every run leaves a 66 MiB
    /dev/shm/deepspeed_allreduce_buffer_* file per rank that nothing removes. So training does not build it.
    """
    # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` attribute is the torch package
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def return_freed_memory(threshold: int = 64 * 2**10) -> None:
    """CPU ranks: allocations above `threshold` bytes get their own mapping, returned to the system when freed.

    glibc raises its mmap threshold to the size of any mapped block that is freed (up to 32 MiB), after which such
    blocks come from the heap, where freed memory stays resident. ZeRO-3 gathers and frees layer-sized buffers every
    step, so a CPU rank's resident memory grew by ~0.7 GiB above what it used (0.2 B-parameter model, 2 ranks);
    mallopt(M_MMAP_THRESHOLD) fixes the threshold (same as MALLOC_MMAP_THRESHOLD_=65536). No-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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


def on_gpu() -> bool:
    """Whether this process trains on CUDA devices (the policies' "auto" values resolve for GPUs then)."""
    return torch.cuda.is_available()


def resolve_ds_config(cfg: Config, world_size: int) -> dict:
    """The policy JSON completed from our config: batch sizes and clipping, the frozen-tower placement
    (train.placement), "auto" precision and bucket sizes for the devices it runs on; precision checked against
    model.frozen_dtype. The shipped policies are written for GPUs: CPU ranks adapt them here (fp32 where bf16 is
    "auto", gloo-sized buckets, no offload), never the other way round."""
    ds = load_ds_config(cfg.train.ds_config)
    micro, gpu = cfg.data.train.batch_size, on_gpu()
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=cfg.optim.grad_accum,
              train_batch_size=micro * cfg.optim.grad_accum * world_size, gradient_clipping=cfg.optim.grad_clip)
    if not gpu:
        ds.get("zero_optimization", {}).pop("offload_param", None)  # pinned CPU offload needs a GPU
        ds.get("zero_optimization", {}).pop("offload_optimizer", None)
    resolve_precision(ds, gpu, cfg.train.ds_config)
    check_precision(ds, cfg.model.frozen_dtype, cfg.train.ds_config)
    apply_placement(ds, cfg, world_size)
    fill_auto(ds, spec_for_preset(cfg.model.preset).hidden_size(cfg.model.preset), gpu=gpu, where=cfg.train.ds_config)
    return ds


def resolve_precision(ds_config: dict, gpu: bool, where: str = "") -> None:
    """``"bf16": {"enabled": "auto"}``: bf16 on GPUs that compute in it (Ampere and later), fp32 on CPU ranks, where
    bf16 matmuls are emulated and the tiny models train and compare exactly in fp32."""
    section = ds_config.get("bf16", {})
    if section.get("enabled") == "auto":
        section["enabled"] = bool(gpu and torch.cuda.is_bf16_supported())
    if ds_config.get("fp16", {}).get("enabled") == "auto":
        raise ConfigError(f"DeepSpeed config {where}: fp16.enabled \"auto\" is not supported; use bf16 \"auto\"")


FP32_COMMUNICATION_MAX = 2 * 10**9  # trainable parameters up to which a bf16 run reduces its gradients in fp32


def communication_dtype(ds_config: dict, model: nn.Module) -> None:
    """A bf16 run whose trained part is small (BLIP-2's Q-Former: ~110 M parameters) reduces gradients in fp32
    (``communication_data_type``): summing bf16 gradients over 8+ ranks loses their low bits, and the traffic is
    small next to ZeRO's all-gathers of the frozen towers. A value in the policy JSON is kept."""
    if precision(ds_config) != "bf16" or "communication_data_type" in ds_config:
        return
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    if trained <= FP32_COMMUNICATION_MAX:
        ds_config["communication_data_type"] = "fp32"


def precision(ds_config: dict) -> str:
    """'bf16', 'fp16' or 'fp32': the dtype the engine keeps the module in (fp32 masters for trainable parts)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"


def check_precision(ds_config: dict, frozen_dtype: str, where: str = "") -> None:
    """The precision policy's rules: one 16-bit format at a time; fp16 only with loss scaling (an fp16 OPT passes
    gradients too small for fp16 to the Q-Former); frozen towers in the engine's own 16-bit dtype."""
    bf16, fp16 = ds_config.get("bf16", {}), ds_config.get("fp16", {})
    if bf16.get("enabled") and fp16.get("enabled"):
        raise ConfigError(f"DeepSpeed config {where} enables both bf16 and fp16; keep one")
    if fp16.get("enabled") and 0 < float(fp16.get("loss_scale", 0)) <= 1:
        raise ConfigError(f"DeepSpeed config {where}: fp16 with loss_scale {fp16['loss_scale']} means no loss scaling; "
                          "use 0 (dynamic) or use bf16 (ds_configs/zero3_bf16.json)")
    policy = precision(ds_config)
    if frozen_dtype == "float16" and policy != "fp16":
        raise ConfigError("model.frozen_dtype=float16 runs the frozen towers in fp16 without loss scaling (the "
                          "gradients through the OPT underflow); use model.frozen_dtype=bfloat16 with a bf16 policy "
                          "(ds_configs/zero3_bf16.json), or an fp16 DeepSpeed config with loss scaling")
    engine_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(policy)
    if engine_dtype and frozen_dtype not in ("float32", engine_dtype):
        raise ConfigError(f"model.frozen_dtype={frozen_dtype} under a {policy} DeepSpeed config ({where}): the engine "
                          f"keeps every weight in {engine_dtype}; set model.frozen_dtype={engine_dtype}")


def construction_dtype(ds_config: dict, frozen_dtype: str) -> torch.dtype:
    """The dtype a model that will be loaded is built in: the engine's 16-bit dtype, or (fp32 engines) the frozen
    towers' dtype, the trainable parts being cast to fp32 afterwards (cheap: they are small)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), getattr(torch, frozen_dtype))


# "auto" in a policy JSON, from the model's largest hidden size h and where it runs: (GPU, CPU ranks).
# GPUs: buckets of h^2 (transformers' DeepSpeed rule) but at least 5e7 elements (DeepSpeed's own prefetch default),
# prefetch 4 h^2 (OPT's widest matrix, fc1/fc2 at 4h x h: the next one is always in flight; 0.9 h^2 was smaller than
# one 16.8 M projection of OPT-6.7B), biases and norms whole (10 h), DeepSpeed's 1e9 live-parameter limits.
# CPU ranks share one host and gloo runs on the cores that compute: buckets as for GPUs but at least 5e5 elements
# (what the tiny CPU runs were tuned on), every parameter partitioned (persistence 0: each rank holds 1/world),
# and about one transformer layer (12 h^2, at least 1e8) gathered at a time.
AUTO_ZERO = {
    "reduce_bucket_size": lambda h, gpu: max(h * h, 5 * 10**7 if gpu else 5 * 10**5),
    "allgather_bucket_size": lambda h, gpu: max(h * h, 5 * 10**7 if gpu else 5 * 10**5),
    "stage3_prefetch_bucket_size": lambda h, gpu: max(4 * h * h, 5 * 10**7) if gpu else max(int(0.9 * h * h), 5 * 10**5),
    "stage3_param_persistence_threshold": lambda h, gpu: 10 * h if gpu else 0,
    "stage3_max_live_parameters": lambda h, gpu: 10**9 if gpu else max(12 * h * h, 10**8),
    "stage3_max_reuse_distance": lambda h, gpu: 10**9 if gpu else max(12 * h * h, 10**8),
}


def fill_auto(ds_config: dict, hidden: int, gpu: bool, where: str = "") -> None:
    """Replace "auto" values: buckets from the hidden size and the device (AUTO_ZERO), overlap of communication with
    computation on GPUs (NCCL runs beside the kernels; gloo on CPU ranks would only compete for the same cores)."""
    zero = ds_config.get("zero_optimization", {})
    for key, value in list(zero.items()):
        if value != "auto":
            continue
        if key == "overlap_comm":
            zero[key] = gpu
        elif key in AUTO_ZERO:
            zero[key] = AUTO_ZERO[key](hidden, gpu)
        else:
            raise ConfigError(f"DeepSpeed config {where}: zero_optimization.{key} is \"auto\", which expblip cannot "
                              f"fill; give a number (auto works for {sorted(AUTO_ZERO) + ['overlap_comm']})")
    others = [k for k, v in ds_config.items() if v == "auto"]
    if others:
        raise ConfigError(f"DeepSpeed config {where}: {others} are \"auto\"; only zero_optimization buckets can be")


def apply_placement(ds_config: dict, cfg: Config, world_size: int) -> str:
    """Set the ZeRO stage from train.placement ("config" keeps the JSON's): frozen towers replicated on every device
    (ZeRO-2: no all-gather of a frozen OPT each step; gradients and Adam states of the trainable parts still
    partitioned) or partitioned (ZeRO-3). "auto" asks expblip.train.plan whether the replicated towers fit."""
    if cfg.train.placement == "config":
        return ""
    choice, reason = cfg.train.placement, "train.placement"
    if choice == "auto":
        from expblip.train.plan import policy_for_run

        decided = policy_for_run(cfg, world_size)
        choice, reason = decided.placement, decided.why
    zero = ds_config.setdefault("zero_optimization", {})
    zero["stage"] = 2 if choice == "replicated" else 3
    log.info(f"frozen towers {choice} (ZeRO-{zero['stage']}): {reason}")
    return choice


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_partitioned(ds_config: dict, build: Callable[[torch.dtype | None], nn.Module], init: bool = True,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """Run `build(dtype)` so that, under ZeRO-3, each parameter is partitioned as it is created.

    `deepspeed.zero.Init` around Blip2ForConditionalGeneration fails (HF's weight init indexes a partitioned
    embedding row); keeping an HfDeepSpeedConfig alive makes transformers' own construction partition instead.
    Under ZeRO-3 partitions take zero.Init's dtype, so `dtype` goes into the config transformers hands it, and
    build() gets None; otherwise build() gets `dtype`. init=False: transformers' ZeRO-3 initialisation pass (which
    gathers every module in turn to initialise it on rank 0) is skipped, as the weights will be loaded.
    """
    if zero_stage(ds_config) != 3:
        return build(dtype)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(_with_dtype(ds_config, dtype))  # noqa: F841 - transformers keeps a weak reference
    try:
        with nullcontext() if init else _no_zero3_init():
            return build(None)
    finally:
        unset_hf_deepspeed_config()  # later rank-0-only constructions must not become collectives


def _with_dtype(ds_config: dict, dtype: torch.dtype | None) -> dict:
    """A copy of the config whose precision section makes zero.Init create partitions in `dtype`."""
    if dtype is None or dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config)):
        return ds_config
    config = {k: v for k, v in ds_config.items() if k not in ("bf16", "fp16")}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


@contextmanager
def _no_zero3_init():
    """transformers 5.24's _from_config ends a ZeRO-3 construction with initialize_weights_zero3 (a GatheredParameters
    round per module, rank 0 initialising): pointless for parameters about to be loaded. _from_config imports it
    from its module at call time, so replacing the module attribute skips it."""
    import transformers.integrations.deepspeed as hf_ds

    original = hf_ds.initialize_weights_zero3
    hf_ds.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_ds.initialize_weights_zero3 = original


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


def whole_model_fits(model: nn.Module, device: torch.device) -> bool:
    """Collective: whether every rank has the free memory to hold the whole of a ZeRO-3 `model` beside what it holds
    now (the bytes it lacks, +20 % and 256 MiB of room): free memory on its GPU, or on CPU ranks the host's available
    memory shared by the ranks on that host. The same answer on every rank."""
    import socket

    import psutil

    from expblip.train import comm

    held, total = resident_parameter_bytes(model)
    need = int((total - held) * 1.2) + (256 << 20)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    facts = comm.all_gather_object((socket.gethostname(), need, free))
    if device.type == "cuda":  # a GPU per rank
        return all(n <= f for _, n, f in facts)
    per_host: dict[str, list[tuple[int, int]]] = {}  # CPU ranks share their host's memory
    for host, rank_need, rank_free in facts:
        per_host.setdefault(host, []).append((rank_need, rank_free))
    return all(sum(n for n, _ in ranks) <= min(f for _, f in ranks) for ranks in per_host.values())


@contextmanager
def whole_model(engine, enabled: bool):
    """Collective: with `enabled` (a ZeRO-3 engine), its model's parameters gathered whole on every rank and ZeRO-3's
    per-module fetch hooks off (DeepSpeed's `unwrap_model_for_generation`, as TRL generates), so a forward issues no
    collective; hooks and partitions are restored on exit. Yields whether it gathered."""
    if not enabled:
        yield False
        return
    import deepspeed

    with deepspeed.zero.unwrap_model_for_generation(engine):
        yield True


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
