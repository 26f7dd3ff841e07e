"""Precision and memory policy: the bf16 policy's dtypes, activation checkpointing, frozen-tower placement, ZeRO
sizes from the hidden size, the rules that refuse fp16 without loss scaling, and the paper recipes' policies.

Run as a script by the deepspeed launcher (`--dump FILE` + finetune's arguments), it trains like launch/finetune.py
and writes the dtypes the engine holds (module partitions, fp32 master partitions, Adam state) to FILE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_cmd, read_metrics, run_launcher

from expblip.config import ConfigError, load_config
from expblip.model.blip2 import CaptionModel, ModelConfig, apply_freezing, build_model, caption_inputs
from expblip.model.blip2 import enable_checkpointing as checkpoint_towers
from expblip.train import engine

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- activation checkpointing


def _loss_and_grads(tokenizer, towers: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = ModelConfig(freeze_vision=False, dropout=0.0)
    blip2 = build_model(cfg, tokenizer)
    apply_freezing(blip2, cfg, "stage2")
    checkpoint_towers(blip2, towers)
    unit = CaptionModel(blip2).train()
    torch.manual_seed(1)
    inputs = caption_inputs(tokenizer, ["the face shows happiness and raises cheek", "it drops jaw"], 8, 16)
    loss = unit(pixel_values=torch.randn(2, 3, 64, 64), **inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in blip2.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    from expblip.data.synthetic import synthetic_records
    from expblip.model.tokenizer import train_caption_tokenizer

    tokenizer = train_caption_tokenizer([c for r in synthetic_records(40, seed=1) for c in r["captions"]], 300)
    loss, grads = _loss_and_grads(tokenizer, ())
    ckpt_loss, ckpt_grads = _loss_and_grads(tokenizer, ("vision", "qformer", "lm"))
    # the ViT trains (unfrozen) and the frozen OPT passes its input gradient back: every tower is on the path
    assert {n.split(".")[0] for n in grads} == {"vision_model", "qformer", "query_tokens", "language_projection"}
    assert grads.keys() == ckpt_grads.keys()
    assert torch.allclose(ckpt_loss, loss, rtol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name
    layer = next(m for m in CaptionModel(build_model(ModelConfig(), tokenizer)).modules()
                 if type(m).__name__ == "OPTDecoderLayer")
    assert not layer.gradient_checkpointing  # off unless model.checkpointing names the tower


# ---------------------------------------------------------------- DeepSpeed config rules


def _cfg(*overrides: str):
    return load_config(None, ["data.train.shards=unused", *overrides])


def test_fp16_only_with_loss_scaling_and_frozen_towers_in_the_engines_dtype():
    with pytest.raises(ConfigError, match="without loss scaling"):
        engine.check_precision({}, "float16")  # an fp32 engine: fp16 towers would pass unscaled gradients
    with pytest.raises(ConfigError, match="no loss scaling"):
        engine.check_precision({"fp16": {"enabled": True, "loss_scale": 1}}, "float16")
    engine.check_precision({"fp16": {"enabled": True, "loss_scale": 0}}, "float16")  # dynamic loss scaling
    with pytest.raises(ConfigError, match="both bf16 and fp16"):
        engine.check_precision({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "float32")
    with pytest.raises(ConfigError, match="set model.frozen_dtype=float16"):
        engine.check_precision({"fp16": {"enabled": True}}, "bfloat16")  # an fp16 engine holds every weight in fp16
    with pytest.raises(ConfigError, match="frozen_dtype=float16"):
        engine.resolve_ds_config(_cfg("model.frozen_dtype=float16"), 2)


def test_auto_values_follow_the_device():
    """GPUs: buckets of at least 5e7, prefetch >= OPT's widest matrix (4h^2: fc1/fc2), norms and biases whole,
    overlap on. CPU ranks adapt the same JSON: gloo-sized buckets, every parameter partitioned, overlap off."""
    h = 4096
    every = {"zero_optimization": {k: "auto" for k in (*engine.AUTO_ZERO, "overlap_comm")}}
    gpu, cpu = json.loads(json.dumps(every)), json.loads(json.dumps(every))
    engine.fill_auto(gpu, h, gpu=True)
    engine.fill_auto(cpu, h, gpu=False)
    g, c = gpu["zero_optimization"], cpu["zero_optimization"]
    assert g["reduce_bucket_size"] == g["allgather_bucket_size"] == 5 * 10**7
    assert g["stage3_prefetch_bucket_size"] >= 4 * h * h  # the next 4h x h matrix is always in flight
    assert g["stage3_param_persistence_threshold"] == 10 * h and g["overlap_comm"] is True
    assert g["stage3_max_live_parameters"] == g["stage3_max_reuse_distance"] == 10**9
    assert c["reduce_bucket_size"] == h * h and c["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert c["stage3_param_persistence_threshold"] == 0 and c["overlap_comm"] is False
    assert c["stage3_max_live_parameters"] == 12 * h * h
    tiny = json.loads(json.dumps(every))
    engine.fill_auto(tiny, 64, gpu=False)
    assert tiny["zero_optimization"]["reduce_bucket_size"] == 5 * 10**5  # the tiny CPU runs' proven buckets
    with pytest.raises(ConfigError, match="sub_group_size"):
        engine.fill_auto({"zero_optimization": {"sub_group_size": "auto"}}, 64, gpu=False)
    paper = engine.resolve_ds_config(_cfg("model.preset=vitg-opt6.7b", "model.tokenizer=x",
                                          "train.ds_config=ds_configs/zero3_bf16.json"), 8)
    assert engine.precision(paper) == "bf16" and engine.construction_dtype(paper, "float32") == torch.bfloat16


def _pretend_cuda(monkeypatch, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_the_command_users_type_gets_the_gpu_policy_on_cuda_and_fp32_on_cpu(monkeypatch):
    """`deepspeed launch/finetune.py --deepspeed ds_configs/zero3.json` (train.ds_config's default): bf16, buckets
    sized from the model and overlap on a GPU; the same file on CPU ranks trains in fp32 with gloo buckets."""
    cfg = _cfg("model.preset=vitg-opt6.7b", "model.tokenizer=x")
    assert cfg.train.ds_config == "ds_configs/zero3.json"
    cpu = engine.resolve_ds_config(cfg, 8)
    if not torch.cuda.is_available():
        assert engine.precision(cpu) == "fp32" and cpu["zero_optimization"]["overlap_comm"] is False
    _pretend_cuda(monkeypatch)
    for policy in ("ds_configs/zero3.json", "ds_configs/zero2.json"):
        ds = engine.resolve_ds_config(_cfg("model.preset=vitg-opt6.7b", "model.tokenizer=x",
                                           f"train.ds_config={policy}"), 8)
        zero = ds["zero_optimization"]
        assert engine.precision(ds) == "bf16", policy
        assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] >= 4096**2, policy
    assert zero["stage"] == 2 and "stage3_param_persistence_threshold" not in zero
    _pretend_cuda(monkeypatch, bf16=False)  # a V100: no bf16 compute
    assert engine.precision(engine.resolve_ds_config(cfg, 8)) == "fp32"


def test_a_bf16_run_of_a_small_trained_part_reduces_gradients_in_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    bf16 = {"bf16": {"enabled": True}}
    engine.communication_dtype(bf16, model)
    assert bf16["communication_data_type"] == "fp32"
    kept = {"bf16": {"enabled": True}, "communication_data_type": "bf16"}
    engine.communication_dtype(kept, model)
    assert kept["communication_data_type"] == "bf16"  # the JSON's own choice stands
    fp32 = {}
    engine.communication_dtype(fp32, model)
    assert "communication_data_type" not in fp32


def test_placement_sets_the_zero_stage_and_auto_partitions_on_cpu_ranks():
    for placement, stage in (("replicated", 2), ("partitioned", 3)):
        ds = engine.resolve_ds_config(_cfg(f"train.placement={placement}"), 2)
        assert ds["zero_optimization"]["stage"] == stage
    if not torch.cuda.is_available():
        assert engine.resolve_ds_config(_cfg("train.placement=auto", "train.ds_config=ds_configs/zero2.json"),
                                        2)["zero_optimization"]["stage"] == 3


def test_plan_replicates_the_frozen_towers_only_where_they_fit():
    from expblip.train.plan import PlanConfig, make_plan, placement

    big = placement(make_plan(PlanConfig(preset="vitg-opt6.7b", gpu_gib=80, micro_batch=4)))
    small = placement(make_plan(PlanConfig(preset="vitg-opt6.7b", gpu_gib=16, micro_batch=4)))
    assert big[0] == "replicated" and "ZeRO-2 needs" in big[1]
    assert small[0] == "partitioned" and "do not fit" in small[1]


def test_paper_recipes_run_the_bf16_policy_and_say_where_the_towers_go():
    from expblip.train.plan import recipe_table

    for name in ("paper_stage1", "paper_stage2"):
        cfg = load_config(ROOT / "recipes" / f"{name}.yaml")
        ds = engine.load_ds_config(cfg.train.ds_config)
        assert engine.precision(ds) == "bf16" and cfg.model.frozen_dtype == "bfloat16"
        assert cfg.train.placement == "auto" and cfg.train.activation_checkpointing == "auto"
    assert load_config(ROOT / "recipes" / "paper_stage1.yaml").stage1.qformer_tokenizer  # BERT's, read from a path
    table = recipe_table()
    rows = [line for line in table[1:] if line.startswith("paper_stage")]
    assert len(rows) == 6 and all(r.split()[7] in ("replicated", "partitioned") for r in rows)
    assert {"".join(r.split()[1:5]) for r in rows} == {"8x24GB", "8x40GB", "8x80GB"}


def test_paper_stage1_reads_bert_and_never_scans_the_dataset(tmp_path):
    """Without stage1.qformer_tokenizer a paper-scale stage 1 stops before reading any shard."""
    from expblip.train.loop import _qformer_tokenizer

    cfg = _cfg("model.preset=vitg-opt6.7b", "model.tokenizer=x", "train.stage=stage1",
               f"data.train.shards={tmp_path / 'no-such-shards'}")
    with pytest.raises(ConfigError, match="stage1.qformer_tokenizer"):
        _qformer_tokenizer(cfg, 0, tmp_path)


# ---------------------------------------------------------------- under DeepSpeed (2 CPU ranks)


def _train(tiny_shards, weights, run_dir, *extra, dump: Path | None = None):
    cmd = deepspeed_cmd(f"data.train.shards={tiny_shards['train']}", "data.train.batch_size=8",
                        f"model.weights={weights}", "model.dropout=0.0", "optim.lr=3e-3", "optim.min_lr=1e-4",
                        "optim.warmup_steps=2", "train.max_steps=8", "train.log_every=1", "train.ckpt_every=8",
                        "tracking.enabled=false", f"train.run_dir={run_dir}", *extra,
                        *([f"--dump={dump}"] if dump else []), ranks=2)
    if dump:
        cmd[cmd.index("launch/finetune.py")] = str(Path(__file__).resolve())
    proc = run_launcher(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.mark.slow
def test_bf16_policy_keeps_fp32_masters_and_the_loss_falls(tiny_shards, tiny_run_dir, tmp_path):
    losses = _train(tiny_shards, tiny_run_dir / "export", tmp_path / "run", "train.ds_config=ds_configs/zero3_bf16.json",
                    "model.frozen_dtype=bfloat16", "model.checkpointing=[lm]", dump=tmp_path / "dtypes.json")
    held = json.loads((tmp_path / "dtypes.json").read_text())
    assert held["frozen"] == ["torch.bfloat16"] and held["trainable"] == ["torch.bfloat16"]  # compute in bf16
    assert held["masters"] == ["torch.float32"] and held["adam"] == ["torch.float32"]  # fp32 masters and moments
    assert held["masters_numel"] == held["trainable_numel"]  # of exactly the trainable parts (this rank's half)
    # the masters start from the weights' own fp32 values, not from their bf16 rounding
    assert held["start_master_is_source"] and not held["source_is_bf16_exact"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


@pytest.mark.slow
def test_replicated_and_partitioned_frozen_towers_give_the_same_loss(tiny_shards, tiny_run_dir, tmp_path):
    weights = tiny_run_dir / "export"
    replicated = _train(tiny_shards, weights, tmp_path / "replicated", "train.placement=replicated")
    partitioned = _train(tiny_shards, weights, tmp_path / "partitioned", "train.placement=partitioned")
    assert len(replicated) == 8 and replicated[-1] < replicated[0]
    assert replicated == pytest.approx(partitioned, rel=1e-4)


def _dump_dtypes(argv: list[str]) -> int:
    """launch/finetune.py, then a dump of the dtypes the engine holds (rank 0; this rank's partitions)."""
    from expblip.cli import config_parser, parse_config, run_main
    from expblip.train import loop

    parser = config_parser(__doc__)
    parser.add_argument("--dump")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(argv)
    finish, setup, start = loop._finish, loop.setup, {}

    def setup_and_look(cfg, report=None):
        from deepspeed.utils import safe_get_full_fp32_param

        from expblip.model.weights import read_state

        run = setup(cfg, report)
        param = run.engine.module.blip2.language_projection.weight
        master = safe_get_full_fp32_param(param).cpu()  # collective
        source = read_state(cfg.model.weights)["language_projection.weight"]
        start.update(start_master_is_source=bool(torch.equal(master, source)),
                     source_is_bf16_exact=bool(torch.equal(source, source.bfloat16().float())))
        return run

    def dump_then_finish(run) -> None:
        module, zero = run.engine.module, run.engine.optimizer
        trainable = [p for p in module.parameters() if p.requires_grad]
        frozen = [p for p in module.parameters() if not p.requires_grad]
        flats = zero.fp32_partitioned_groups_flat
        held = {"frozen": sorted({str(p.ds_tensor.dtype) for p in frozen}),
                "trainable": sorted({str(p.ds_tensor.dtype) for p in trainable}),
                "masters": sorted({str(f.dtype) for f in flats}), "masters_numel": sum(f.numel() for f in flats),
                "trainable_numel": sum(p.ds_tensor.numel() for p in trainable),
                "adam": sorted({str(s["exp_avg"].dtype) for s in zero.optimizer.state.values()}), **start}
        if run.rank == 0:
            Path(args.dump).write_text(json.dumps(held))
        finish(run)

    loop._finish, loop.setup = dump_then_finish, setup_and_look
    return run_main(lambda: loop.train(parse_config(args)))


if __name__ == "__main__":
    sys.exit(_dump_dtypes(sys.argv[1:]))
