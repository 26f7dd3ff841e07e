"""The process group, each rank's device, and which group carries which exchange.

    device = comm.bind_device()          # before the first collective: LOCAL_RANK's GPU (deepspeed launcher, torchrun)
    rank, world = comm.init_distributed()
    dist.all_reduce(flag, group=comm.host_group())   # a host-side exchange of expblip's own

Two groups over the same ranks (as torchtitan keeps device and host traffic apart):

- **the default group**, created with the launcher's backend: NCCL on GPUs, gloo on CPU ranks. It carries what
  lives on the engine's device: DeepSpeed's ZeRO collectives and the model's own (stage 1's feature gather).
- **the host group** (``host_group()``): gloo. It carries every exchange of host-side values that expblip itself
  makes: the data stream's failure flag at each micro-batch, the logged metrics, held-out sums, pickled objects,
  barriers, and checkpoint state read from rank 0's files. An NCCL group has no CPU backend (a CPU tensor raises "No
  backend type associated with device type cpu"), and a host value sent through NCCL would be copied to the GPU and
  synchronise its stream, at every micro-batch for the failure flag.

Device binding: each rank calls ``torch.cuda.set_device`` before its first collective (NCCL and pickled objects use
the current device; unbound, every rank of a node uses cuda:0). Under the deepspeed launcher and torchrun that is
LOCAL_RANK's GPU; under Ray Train it is the device Ray assigned (``ray.train.torch.get_device()``, which need not be
LOCAL_RANK when a node's workers share CUDA_VISIBLE_DEVICES), and LOCAL_RANK is set to its index, since DeepSpeed's
engine binds the device at LOCAL_RANK again.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from expblip.config import COLLECTIVE_TIMEOUT_S, ConfigError
from expblip.log import get_logger

log = get_logger(__name__)

_OWN_GROUP = False  # this process created the default group (deepspeed launcher, torchrun, lone python), not Ray
_HOST_GROUP = None  # the gloo group of expblip's host-side exchanges (init_distributed)
_DEVICE: torch.device | None = None  # the device this rank computes on, once bound


def bind_device(device: torch.device | str | None = None) -> torch.device:
    """Bind this rank to its GPU (``device``, else LOCAL_RANK's) and return it; the CPU without CUDA. Idempotent: a
    device already bound (Ray's, before the loop's own call) is kept."""
    global _DEVICE
    if _DEVICE is not None:
        return _DEVICE
    if not torch.cuda.is_available():
        _DEVICE = torch.device("cpu")
        return _DEVICE
    device = torch.device(device if device is not None else f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}")
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"this rank's GPU cuda:{index} (LOCAL_RANK) does not exist: {torch.cuda.device_count()} "
                              "visible (CUDA_VISIBLE_DEVICES); start at most that many ranks per node")
        torch.cuda.set_device(index)
        os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed's engine binds LOCAL_RANK's device again: the same one
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (an fp32 policy, fp32 losses) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", index)
    _DEVICE = device
    return device


def device() -> torch.device:
    """The device this rank computes on (bound by bind_device)."""
    return _DEVICE if _DEVICE is not None else bind_device()


def refuse_cpu_accelerator_on_gpu() -> None:
    """DS_ACCELERATOR=cpu (exported for CPU runs by the Makefile and forwarded to Ray workers) on a machine with CUDA
    would run DeepSpeed's CPU accelerator beside NCCL: refuse it, naming the fix."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" and torch.cuda.is_available():
        raise ConfigError("DS_ACCELERATOR=cpu is set on a machine with CUDA GPUs: DeepSpeed would use its CPU "
                          "accelerator beside NCCL. Unset it (`unset DS_ACCELERATOR`; the Makefile sets it only where "
                          "nvidia-smi is absent) or run on a CPU-only machine")


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group: deepspeed launcher, torchrun, Ray Train, or a lone `python` process; bind
    the device first and create the host group. Idempotent. Returns (rank, world size)."""
    import deepspeed

    global _OWN_GROUP, _HOST_GROUP
    if _HOST_GROUP is not None:
        return dist.get_rank(), dist.get_world_size()
    refuse_cpu_accelerator_on_gpu()
    _OWN_GROUP = not dist.is_initialized()
    if "RANK" not in os.environ:  # a plain `python launch/finetune.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    bound = bind_device()  # before any collective, the group's own creation included
    backend = "nccl" if bound.type == "cuda" else "gloo"
    if backend == "gloo":
        from expblip.train.engine import return_freed_memory, skip_cpu_shm_all_reduce

        skip_cpu_shm_all_reduce()
        return_freed_memory()
    # explicit: a rank whose storage is out makes the others wait in a collective for up to data.max_outage_s
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def host_group():
    """The gloo group of expblip's host-side exchanges (CPU tensors, pickled objects, barriers); a gloo default
    group that another caller created (a test, a bench) serves as one."""
    if _HOST_GROUP is None:
        if dist.is_initialized() and dist.get_backend() == "gloo":
            return None
        raise RuntimeError("comm.init_distributed() has not run: there is no host group yet")
    return _HOST_GROUP


def group_of(tensor: torch.Tensor):
    """The group a tensor's exchange belongs on: the host group for CPU tensors, the default one for device ones."""
    return host_group() if tensor.device.type == "cpu" else None


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place, on the group of the tensor's device (group_of); returns it."""
    dist.all_reduce(tensor, op=op, group=group_of(tensor))
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place from rank `src`, on the group of the tensor's device (group_of); returns it."""
    dist.broadcast(tensor, src=src, group=group_of(tensor))
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj`, on every rank (through the host group: pickles never touch a GPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order (through the host group)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def barrier() -> None:
    """Every rank reaches this point (on the host group: no GPU stream, no current-device guess)."""
    dist.barrier(group=host_group())


def close_distributed() -> None:
    """Destroy the process groups this process created, after a run that ended well (torchtitan's rule: never after
    an error, where peers may still sit in a collective). Left to interpreter exit, gloo's worker threads can abort
    the process with "terminate called without an active exception" (pytorch #190489). Ray Train closes its own
    default group; the host group is ours either way."""
    global _OWN_GROUP, _HOST_GROUP
    if _HOST_GROUP is not None and dist.is_initialized():
        barrier()  # no rank tears its transport down while a peer still uses it
        if _OWN_GROUP:
            dist.destroy_process_group()
        else:
            dist.destroy_process_group(_HOST_GROUP)
    _OWN_GROUP, _HOST_GROUP = False, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
