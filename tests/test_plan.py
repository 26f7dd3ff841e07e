"""Memory plan: parameter counts from the meta-built preset, DeepSpeed's estimates and ours, the printed table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import launch_module

from expblip.train.plan import GiB, PlanConfig, count_params, make_plan

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def plan():
    return make_plan(PlanConfig(preset="vitg-opt6.7b", gpus_per_node=8, nodes=1, micro_batch=4, gpu_gib=80))


def test_counts_match_the_meta_built_model(plan):
    from transformers import Blip2ForConditionalGeneration

    from expblip.model.blip2 import ModelConfig, blip2_config
    from expblip.train.plan import _VocabOnly

    config = blip2_config(ModelConfig(preset="vitg-opt6.7b", tokenizer="-"), _VocabOnly(50265))
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    seen: dict[int, str] = {}
    towers = {"vision_model": 0, "qformer": 0, "query_tokens": 0, "language_projection": 0, "language_model": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:  # OPT's lm_head is its embedding: count it once
            seen[id(p)] = name
            towers[name.split(".")[0]] += p.numel()
    c = plan.counts
    assert c.vision == towers["vision_model"]
    assert c.qformer == towers["qformer"] + towers["query_tokens"]
    assert c.projection == towers["language_projection"] == 768 * 4096 + 4096
    assert c.lm == towers["language_model"]
    assert c.total == sum(towers.values())
    assert 7.7e9 < c.total < 7.8e9  # the public blip2-opt-6.7b: 7.75B
    assert c.largest_layer == 50272 * 4096  # OPT's embedding
    assert plan.config.trainable == "qformer" and c.trainable("qformer") == c.qformer + c.projection


def test_zero3_beats_zero2_and_offload_moves_memory_to_the_cpu(plan):
    z2, z3, off = plan.rows
    assert z3.ds_gpu < z2.ds_gpu and z3.states_gpu < z2.states_gpu  # partitioned weights
    assert off.states_gpu < z3.states_gpu and off.ds_gpu < z3.ds_gpu
    assert off.cpu_node > 0 == z3.cpu_node == z2.cpu_node and off.ds_cpu_node > z3.ds_cpu_node
    for row in plan.rows:  # frozen towers need only their weights: ours is below DeepSpeed's all-trainable figure
        assert row.states_gpu + row.cpu_node < row.ds_gpu + row.ds_cpu_node
    # ZeRO-2 replicates the 16-bit weights: 2 bytes/param, plus 18 bytes/trainable param over 8 GPUs
    c = plan.counts
    assert z2.states_gpu == pytest.approx(2 * c.total + 18 * c.trainable("qformer") / 8)
    assert 1 * GiB < z2.act_gpu < 4 * GiB and z2.act_ckpt_gpu < z2.act_gpu / 3  # OPT dominates, ckpt saves most
    assert all(row.fits for row in plan.rows)  # 8 × 80 GB: every strategy fits


def test_our_deepspeed_figures_are_deepspeeds_own_printout(plan, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    c = plan.counts
    estimate_zero3_model_states_mem_needs_all_cold(c.total, c.largest_layer, num_gpus_per_node=8, num_nodes=1)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "offload_param=none, offload_optimizer=none, zero_init=1" in ln)
    cpu, gpu = (float(x) for x in re.findall(r"([\d.]+)GB", line))
    assert plan.row("zero3").ds_gpu / GiB == pytest.approx(gpu, abs=0.01)
    assert plan.row("zero3").ds_cpu_node / GiB == pytest.approx(cpu, abs=0.01)


def test_training_the_vit_costs_states_and_activations(plan):
    vit = make_plan(PlanConfig(preset="vitg-opt6.7b", trainable="qformer+vit"), plan.counts)
    extra = 18 * plan.counts.vision / 8
    assert vit.row("zero3").states_gpu - plan.row("zero3").states_gpu == pytest.approx(extra)
    assert vit.activations["vision"] > 20 * plan.activations["vision"]  # 39 stored layers instead of one


def test_script_prints_the_table_and_the_verdicts(capsys):
    main = launch_module("plan").main
    assert main(["--preset", "vitg-opt6.7b", "--gpus-per-node", "8", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "vitg-opt6.7b: 7,753M parameters" in out
    for label in ("ZeRO-2", "ZeRO-3", "ZeRO-3 + CPU offload"):
        assert re.search(rf"^{re.escape(label)} +\|.* yes$", out, re.M), out
    # one 12 GiB GPU: only offloading fits the 16-bit towers
    assert main(["--preset", "vitg-opt6.7b", "--gpus-per-node", "1", "--gpu-gib", "12"]) == 0
    rows = {ln.split("|")[0].strip(): ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "|" in ln}
    assert rows["ZeRO-2"] == "no" and rows["ZeRO-3"] == "no" and rows["ZeRO-3 + CPU offload"] == "yes"


def test_script_refuses_an_unknown_preset(capsys):
    assert launch_module("plan").main(["--preset", "vitx"]) == 2
    assert "--preset 'vitx' does not exist" in capsys.readouterr().err


def test_tiny_preset_counts_every_parameter_of_the_built_model():
    from expblip.data.synthetic import synthetic_records
    from expblip.model.blip2 import ModelConfig, build_model
    from expblip.model.tokenizer import train_caption_tokenizer

    counts = count_params("tiny")  # on the meta device, with the preset's 512-word vocabulary
    captions = [c for r in synthetic_records(200, seed=1) for c in r["captions"]]
    model = build_model(ModelConfig(), train_caption_tokenizer(captions, vocab_size=512))

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert (counts.vision, counts.qformer + counts.projection - model.query_tokens.numel()) == (
        size(model.vision_model), size(model.qformer) + size(model.language_projection))
    # the LM differs only by the vocabulary rows the trained tokenizer did not fill (tied input/output embedding):
    # the plan counts 512 words + <image>; this tokenizer learnt fewer (its vocab_size includes <image>)
    text = model.config.text_config
    assert counts.lm - size(model.language_model) == (512 + 1 - text.vocab_size) * text.word_embed_proj_dim  # + <image>
    assert counts.total == counts.vision + counts.qformer + counts.projection + counts.lm
