"""Resume at another world size: a ZeRO-3 checkpoint of 2 ranks continues on 1 and on 3 with the same state.

Run as a script (by the deepspeed launcher, see `_resume_cmd`) it resumes, dumps the state it restored, then trains on.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_collectives_suit_nccl, audit_env, deepspeed_cmd, read_keys, read_metrics, run_launcher
from test_train import init_export  # noqa: F401 - the module-scoped fixture of the initial weights

from expblip.model.weights import read_state

pytestmark = pytest.mark.slow
ZERO3 = "ds_configs/zero3.json"
# Two shards of 64: an epoch is 128 samples, 8 steps of 2 ranks x 8. Stopped at step 7, 16 samples of epoch 0 are
# left: the resumed runs take them and go on into epoch 1 (1 rank: exactly them; 3 ranks: them and 32 more).
MAX_STEPS, STOPPED_AT, EPOCH = 9, 7, 128


def _args(tiny_shards, weights, run_dir) -> list[str]:
    return [f"data.train.shards={tiny_shards['train']}/shard-{{000000..000001}}.tar", "data.train.batch_size=8",
            f"model.weights={weights}", "model.dropout=0.0", "optim.lr=3e-3", "optim.min_lr=1e-4",
            "optim.warmup_steps=2", f"train.max_steps={MAX_STEPS}", "train.log_every=1",
            f"train.ckpt_every={STOPPED_AT}", "tracking.enabled=false", f"train.run_dir={run_dir}", "train.log_keys=true",
            "train.placement=auto", "train.activation_checkpointing=auto"]


@pytest.fixture(scope="module")
def stopped(tiny_shards, init_export, tmp_path_factory):  # noqa: F811
    """2 ranks trained to a checkpoint at step 7 of 9: (run dir, launcher stdout, collective audit directory)."""
    run_dir, audit = tmp_path_factory.mktemp("two-ranks"), tmp_path_factory.mktemp("two-ranks-audit")
    proc = run_launcher(deepspeed_cmd("--deepspeed", ZERO3, *_args(tiny_shards, init_export, run_dir),
                                      f"train.stop_after={STOPPED_AT}", ranks=2), env=audit_env(audit))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout, audit


def test_placement_and_checkpointing_are_decided_once_and_every_collective_suits_nccl(stopped):
    """train.placement=auto and train.activation_checkpointing=auto: rank 0 decides (CPU ranks: partitioned, and no
    checkpointing for the tiny model in the host's memory) and logs it once; every rank builds that engine. The run
    ran under the collective audit (tests/audit)."""
    decided = [ln for ln in stopped[1].splitlines() if "activation checkpointing none" in ln]
    assert len(decided) == 1 and "frozen towers partitioned" in decided[0], decided
    assert_collectives_suit_nccl(stopped[2], {"expblip.train.loop", "expblip.train.checkpoint"})


def test_each_rank_holds_half_the_parameters(stopped):
    # rank 0 logs every rank's share: "resident parameters per rank (MiB of T): rank 0 H (share S), rank 1 ..."
    line = next(ln for ln in stopped[1].splitlines() if "resident parameters per rank" in ln)
    total = float(re.search(r"\(MiB of ([\d.]+)\)", line).group(1))
    lines = re.findall(r"rank (\d) ([\d.]+) \(share ([\d.]+)\)", line)
    assert sorted(int(r) for r, *_ in lines) == [0, 1], line
    print(line)  # shown by pytest -rP
    for _, held, share in lines:
        # a ZeRO-3 slice holds ceil(numel / world) elements: at most world - 1 padding elements per parameter, a few
        # hundred of the tiny model's ~1.5e5 parameters, so the share sits within 1% of 1/world
        assert float(share) == pytest.approx(1 / 2, abs=0.01)
        assert float(held) < 0.51 * total


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_resumes_on_another_world_size(stopped, world, tiny_shards, init_export,  # noqa: F811
                                                           tmp_path):
    from expblip.config import load_config
    from expblip.train.optim import lr_at

    run_dir = tmp_path / "run"
    shutil.copytree(stopped[0], run_dir)
    args = _args(tiny_shards, init_export, run_dir)
    proc = run_launcher(_resume_cmd(*args, f"--dump={tmp_path / 'restored'}", ranks=world),
                        env=audit_env(tmp_path / "audit"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the elastic restore's broadcasts (rank 0's elastic.pt to every rank) would run on a GPU node's NCCL group
    restore = assert_collectives_suit_nccl(tmp_path / "audit", {"expblip.train.checkpoint"})
    assert any(r["op"] == "broadcast" and r["caller"].startswith("expblip.train.checkpoint") for r in restore)
    assert f"start step {STOPPED_AT}" in proc.stdout and f"written by 2 ranks and this run has {world}" in proc.stdout
    assert "the data continues at its global position 112 (epoch 0, sample 112 of it)" in proc.stdout

    saved = torch.load(run_dir / "checkpoints" / f"step{STOPPED_AT:08d}" / "elastic.pt", weights_only=True)
    restored = torch.load(tmp_path / "restored" / "elastic.pt", weights_only=True)
    # the Q-Former trains; the ViT and OPT are frozen and not repeated in elastic.pt: they are re-read from
    # model.weights, where they came from
    assert saved["fp32"] and not saved["weights"] and saved["frozen_from"] == str(init_export)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == restored[key].keys(), key
        assert all(torch.equal(saved[key][k], restored[key][k]) for k in saved[key]), key
    initial = read_state(init_export)
    assert restored["weights"] and all(torch.equal(v, initial[k.removeprefix("blip2.")])
                                       for k, v in restored["weights"].items())
    assert any(v.abs().sum() > 0 for v in restored["exp_avg_sq"].values())  # moments of 4 steps, not fresh zeros
    assert restored["optimizer_step"] == saved["optimizer_step"] == STOPPED_AT
    assert restored["lr_scheduler"]["last_epoch"] == saved["lr_scheduler"]["last_epoch"] == STOPPED_AT
    assert restored["param_groups"] == saved["param_groups"] and restored["counters"] == saved["counters"]
    module = torch.load(tmp_path / "restored" / "module.pt", weights_only=True)  # what forward will compute with
    assert all(torch.equal(module[k], v) for k, v in {**restored["weights"], **saved["fp32"]}.items())

    # the data: the resumed run continues at the checkpoint's global position; epoch 0 is consumed exactly once
    keys = read_keys(run_dir)
    assert sorted(keys) == list(range(1, MAX_STEPS + 1))
    assert {len(keys[s]) for s in range(1, STOPPED_AT + 1)} == {16} and {len(keys[s]) for s in (8, 9)} == {8 * world}
    consumed = [(k, e) for s in sorted(keys) for k, e in keys[s]]
    epoch0 = [k for k, e in consumed if e == 0]
    assert len(epoch0) == EPOCH and len(set(epoch0)) == EPOCH, "a sample of epoch 0 repeated or missing"
    assert len(consumed) == STOPPED_AT * 16 + 2 * 8 * world and all(e == 1 for _, e in consumed[EPOCH:])

    metrics = read_metrics(run_dir)  # steps 1-STOPPED_AT from 2 ranks, then this run's
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    optim = load_config(None, args).optim
    assert [m["lr"] for m in metrics] == pytest.approx([lr_at(s, optim, MAX_STEPS) for s in range(1, MAX_STEPS + 1)])
    assert (run_dir / "checkpoints" / f"step{MAX_STEPS:08d}" / f"rank{world - 1}.pt").is_file()


def _resume_cmd(*args: str, ranks: int) -> list[str]:
    """deepspeed_cmd, but running this file as the training script."""
    cmd = deepspeed_cmd("--deepspeed", ZERO3, *args, ranks=ranks)
    cmd[cmd.index("launch/finetune.py")] = str(Path(__file__).resolve())
    return cmd


def _resume_dump_and_train(argv: list[str]) -> int:
    """launch/finetune.py, with setup() followed by a dump of the state it restored (elastic.pt + module weights)."""
    from expblip.cli import config_parser, parse_config, run_main
    from expblip.train import checkpoint, loop

    parser = config_parser(__doc__)
    parser.add_argument("--deepspeed")
    parser.add_argument("--dump")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(argv)
    setup = loop.setup

    def setup_and_dump(cfg, report=None):
        run = setup(cfg, report)
        out = Path(args.dump)
        checkpoint.save_elastic(run.engine, out, run.rank, {})
        module = checkpoint.consolidated_state_dict(run.engine.module, run.rank)
        if run.rank == 0:
            torch.save(module, out / "module.pt")
        return run

    loop.setup = setup_and_dump
    return run_main(lambda: loop.train(parse_config(args, [f"train.ds_config={args.deepspeed}"])))


if __name__ == "__main__":
    sys.exit(_resume_dump_and_train(sys.argv[1:]))


def test_frozen_towers_in_bf16_trainable_parts_in_fp32(tiny_shards, init_export, tmp_path):  # noqa: F811
    """model.frozen_dtype under ZeRO-3 (kept in this file, which owns the partitioned-memory checks)."""
    steps = 8
    # no model.weights: random towers from the seed, so elastic.pt holds the frozen towers as the engine kept them
    args = [*_args(tiny_shards, init_export, tmp_path), f"train.max_steps={steps}", f"train.ckpt_every={steps}",
            "model.frozen_dtype=bfloat16", "model.weights="]
    proc = run_launcher(deepspeed_cmd("--deepspeed", ZERO3, *args, ranks=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the training state as the engine held it (the HF export is written through an fp32 model)
    state = torch.load(tmp_path / "checkpoints" / f"step{steps:08d}" / "elastic.pt", weights_only=True)
    frozen, masters = state["weights"], state["fp32"]
    assert {k.split(".")[1] for k in frozen} == {"vision_model", "language_model"}
    assert {k.split(".")[1] for k in masters} == {"qformer", "query_tokens", "language_projection"}
    assert {v.dtype for v in frozen.values()} == {torch.bfloat16}
    assert {v.dtype for v in masters.values()} == {torch.float32}
    # the resident line counts the bf16 towers at 2 bytes: the whole model is smaller than in fp32
    total = {float(t) for t in re.findall(r"resident parameters per rank \(MiB of ([\d.]+)\)", proc.stdout)}
    assert len(total) == 1 and total.pop() < 0.8 * _model_mib(frozen, masters, bytes_per_element=4)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def _model_mib(*states: dict, bytes_per_element: int) -> float:
    return sum(v.numel() for s in states for v in s.values()) * bytes_per_element / 2**20
