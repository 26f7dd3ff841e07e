"""A Qwen2.5-VL LoRA run stopped on 2 ranks resumes on 1 (ZeRO-3, the deepspeed launcher) and continues exactly:
the adapters, the merger, their Adam moments and the schedule come back as saved, and the data goes on at the
checkpoint's global position, every sample of the epoch seen once (expblip.data.order)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import REPO, deepspeed_cmd, read_keys, read_metrics, run_launcher

pytestmark = pytest.mark.slow
ZERO3 = "ds_configs/zero3.json"
MAX_STEPS, STOPPED_AT, EPOCH = 9, 7, 128  # two shards of 64: 8 steps of 2 ranks x 8 an epoch


def _args(tiny_shards, run_dir) -> list[str]:
    return ["--config", "recipes/tiny_qwen_vl.yaml",
            f"data.train.shards={tiny_shards['train']}/shard-{{000000..000001}}.tar", "data.train.batch_size=8",
            "model.freeze_lm=true", "model.freeze_vision=true", "model.lora.towers=[lm]", "model.lora.r=4",
            "model.lora.alpha=16", "model.lora.dropout=0.0", "optim.warmup_steps=2", f"train.max_steps={MAX_STEPS}",
            "train.log_every=1",
            f"train.ckpt_every={STOPPED_AT}", "tracking.enabled=false", f"train.run_dir={run_dir}",
            "train.log_keys=true"]


@pytest.fixture(scope="module")
def stopped(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qwen-vl-two-ranks")
    proc = run_launcher(deepspeed_cmd("--deepspeed", ZERO3, *_args(tiny_shards, run_dir),
                                      f"train.stop_after={STOPPED_AT}", ranks=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_lora_run_stopped_on_two_ranks_resumes_on_one_and_continues_exactly(stopped, tiny_shards, tmp_path):
    from test_world_size import _resume_cmd

    from expblip.config import load_config
    from expblip.train.optim import lr_at

    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    args = _args(tiny_shards, run_dir)
    proc = run_launcher(_resume_cmd(*args, f"--dump={tmp_path / 'restored'}", ranks=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"start step {STOPPED_AT}" in proc.stdout and "written by 2 ranks and this run has 1" in proc.stdout

    saved = torch.load(run_dir / "checkpoints" / f"step{STOPPED_AT:08d}" / "elastic.pt", weights_only=True)
    restored = torch.load(tmp_path / "restored" / "elastic.pt", weights_only=True)
    trained = set(saved["fp32"])
    assert trained and all(".lora_" in k or ".merger." in k for k in trained)  # adapters and the merger train
    assert any(".lora_A." in k for k in trained) and not any("base_layer" in k for k in trained)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == restored[key].keys(), key
        assert all(torch.equal(saved[key][k], restored[key][k]) for k in saved[key]), key
    assert any(v.abs().sum() > 0 for v in restored["exp_avg_sq"].values())  # moments of 7 steps, not zeros
    assert restored["optimizer_step"] == saved["optimizer_step"] == STOPPED_AT
    assert restored["lr_scheduler"]["last_epoch"] == saved["lr_scheduler"]["last_epoch"] == STOPPED_AT
    module = torch.load(tmp_path / "restored" / "module.pt", weights_only=True)  # what forward computes with
    assert all(torch.equal(module[k], v) for k, v in saved["fp32"].items())

    keys = read_keys(run_dir)
    assert sorted(keys) == list(range(1, MAX_STEPS + 1))
    consumed = [(k, e) for s in sorted(keys) for k, e in keys[s]]
    epoch0 = [k for k, e in consumed if e == 0]
    assert len(epoch0) == EPOCH and len(set(epoch0)) == EPOCH, "a sample of epoch 0 repeated or missing"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    optim = load_config(REPO / "recipes" / "tiny_qwen_vl.yaml", args[2:]).optim
    assert [m["lr"] for m in metrics] == pytest.approx([lr_at(s, optim, MAX_STEPS) for s in range(1, MAX_STEPS + 1)])
