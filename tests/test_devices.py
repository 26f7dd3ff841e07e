"""The training loop on CUDA and NCCL, proven on CPU ranks: device binding under both launchers, the collective
audit (tests/audit/collective_audit.py) that a real 2-rank run is checked with (tests/test_world_size.py), the CUDA
RNG state in checkpoints, and DS_ACCELERATOR=cpu refused on a GPU machine. torch.cuda is mocked where a GPU's
answers are needed: nothing here needs one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from expblip.config import ConfigError
from expblip.train import comm

AUDIT = Path(__file__).resolve().parent / "audit"


@pytest.fixture
def events(monkeypatch):
    """A GPU node as torch.cuda reports it (4 devices), the default group not yet created, and a log of what
    happens in order: device binding, group creation, collectives."""
    import deepspeed
    import torch.distributed as dist

    log: list[tuple] = []
    monkeypatch.setattr(comm, "_DEVICE", None)
    monkeypatch.setattr(comm, "_HOST_GROUP", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(("bind", d)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: log.append(("init", kw["dist_backend"])))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "new_group", lambda **kw: log.append(("new_group", kw["backend"])) or "host")
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: log.append(("gather", group)))
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    return log


def test_the_deepspeed_launcher_binds_local_ranks_gpu_before_any_collective(events, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert comm.init_distributed() == (1, 2)
    assert events == [("bind", 1), ("init", "nccl"), ("new_group", "gloo")]
    assert comm.device() == torch.device("cuda", 1)


def test_a_ray_worker_binds_the_device_ray_gave_it_and_deepspeed_gets_the_same(events, monkeypatch):
    """A node's Ray workers share CUDA_VISIBLE_DEVICES: Ray's device for local rank 1 may be cuda:3. The worker
    binds it before its first collective (_log_placement's gather), and LOCAL_RANK, which DeepSpeed's engine binds
    again, names the same device."""
    import ray
    import ray.train.torch

    from expblip.train import ray_job

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 3))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n" * 20})())
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    ray_job._bind_ray_device()
    ray_job._log_placement(1)
    assert events == [("bind", 3), ("init", "nccl"), ("new_group", "gloo"), ("gather", "host")]
    assert comm.device() == torch.device("cuda", 3)
    import os

    assert os.environ["LOCAL_RANK"] == "3"


def test_a_rank_beyond_the_visible_gpus_is_refused(events, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "6")
    with pytest.raises(ConfigError, match="cuda:6 .* does not exist: 4 visible"):
        comm.bind_device()


def test_ds_accelerator_cpu_is_refused_on_a_cuda_machine(events, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu .* Unset it"):
        comm.init_distributed()
    assert events == []  # refused before binding or creating anything


def test_a_checkpoint_holds_the_cuda_rng_state_when_there_is_one(monkeypatch):
    from expblip.train import checkpoint

    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: restored.append(s))
    saved = checkpoint.rank_state({"position": 3})
    assert torch.equal(saved["cuda_rng"], state)
    checkpoint.restore_rng(saved)
    assert len(restored) == 1 and torch.equal(restored[0], state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda_rng" not in checkpoint.rank_state({})  # no CUDA: nothing to hold, and restoring skips it
    checkpoint.restore_rng(saved)
    assert len(restored) == 1


PROBE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {audit!r})
import collective_audit
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
collective_audit.install({out!r})
host = dist.new_group(backend="gloo")
ours = {{"__name__": "expblip.train.probe", "dist": dist, "torch": torch, "host": host}}
exec(compile('''
dist.all_reduce(torch.zeros(1))                 # a CPU tensor on the default group: NCCL on a GPU node raises
dist.all_reduce(torch.zeros(1), group=host)     # the host group: right
dist.broadcast_object_list([1])                 # pickles through the current CUDA device
dist.broadcast_object_list([1], group=host)     # right
dist.barrier(group=host)
''', "expblip/train/probe.py", "exec"), ours)
dist.all_reduce(torch.zeros(1))                 # not expblip's: not audited
dist.destroy_process_group()
"""


def test_the_audit_flags_a_cpu_tensor_on_a_group_declared_cuda_only(tmp_path):
    sys.path.insert(0, str(AUDIT))
    import collective_audit

    script = PROBE.format(audit=str(AUDIT), store=tmp_path / "store", out=str(tmp_path / "audit"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = collective_audit.read(str(tmp_path / "audit"))
    assert [(r["op"], r["group"], r["violation"]) for r in records] == [
        ("all_reduce", "cuda-only", True), ("all_reduce", "gloo", False),
        ("broadcast_object_list", "cuda-only", True), ("broadcast_object_list", "gloo", False),
        ("barrier", "gloo", False)]
    assert records[0]["device"] == "cpu" and records[0]["caller"].startswith("expblip.train.probe:")
