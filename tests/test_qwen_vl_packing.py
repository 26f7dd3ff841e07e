"""Packing short caption samples (data.pack_tokens, Qwen2.5-VL stage 2): several samples per row, each with its own
text and mRoPE positions and its attention kept within itself. The loss and gradients equal the padded batch's; a
packing that lets positions run on and attention cross samples (the bug LLaMA-Factory #7754 / #10314 fixed) does not;
the loop trains the same losses packed or padded; other families and stages refuse it naming the key."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, deepspeed_cmd, read_metrics, run_launcher

from expblip.model import qwen_vl
from expblip.pixels import normalise_batch

CAPTIONS = ["it is a people who raises inner eyebrow and separates lips.", "none", "au1, au2",
            "it is a people who lowers brow.", "anger",
            "it is a people who raises cheek, stretches lips, separates lips and drops jaw."]
PROMPTS = ["", "List the active action units.", "", "", "Which emotion is it?", ""]
SIZES = [(64, 64), (48, 80), (64, 48), (32, 64), (64, 64), (80, 48)]  # dynamic resolution: ragged images
RECIPE = REPO / "recipes" / "tiny_qwen_vl.yaml"


@pytest.fixture(scope="module")
def batch():
    """(model, caption unit, padded text inputs, pixel inputs): a tiny random Qwen2.5-VL and six samples of other
    lengths."""
    torch.manual_seed(0)
    tokenizer = qwen_vl.tiny_tokenizer(CAPTIONS * 4 + PROMPTS, 300)
    processor = qwen_vl.make_processor(tokenizer, 256, 4096)
    model = qwen_vl.build_model(tokenizer)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in SIZES]
    pixels = qwen_vl.spec_pixel_inputs(model.config, normalise_batch(images))
    text = qwen_vl.spec_text_inputs(processor, model.config, CAPTIONS, PROMPTS, 32, image_sizes=SIZES)
    return model, qwen_vl.CaptionUnit(model), text, pixels


def loss_and_grads(model, unit, inputs) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = unit(**inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_give_the_padded_batchs_loss_and_gradients(batch):
    model, unit, padded, pixels = batch
    packed = qwen_vl.pack_inputs(model, padded, SIZES, max_tokens=260)
    lengths = padded["attention_mask"].sum(-1)
    assert packed["input_ids"].shape[0] == 2 < len(CAPTIONS)  # six samples in two rows
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    assert "attention_mask" not in packed and packed["position_ids"].shape == (4, *packed["input_ids"].shape)
    want, want_grads = loss_and_grads(model, unit, {**padded, **pixels})
    got, got_grads = loss_and_grads(model, unit, {**packed, **pixels})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # each sample keeps its own positions: text 0..n-1 and the padded batch's mRoPE (t, h, w) rows
    mrope, _ = model.model.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"], pixels["image_grid_thw"],
                                          attention_mask=padded["attention_mask"])
    rows, at, row = packed["position_ids"], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if at + n > packed["input_ids"].shape[1] or (at and rows[0, row, at] != 0):
            row, at = row + 1, 0
        assert torch.equal(rows[0, row, at:at + n], torch.arange(n)), i
        assert torch.equal(rows[1:, row, at:at + n], mrope[:, i, :n]), i
        assert torch.equal(packed["input_ids"][row, at:at + n], padded["input_ids"][i, :n]), i
        at += n


def test_packing_that_lets_positions_run_on_and_attention_cross_samples_changes_the_loss(batch):
    """The control: the same rows without per-sample positions (one causal sequence per row) is another loss."""
    model, unit, padded, pixels = batch
    packed = qwen_vl.pack_inputs(model, padded, SIZES, max_tokens=260)
    naive = {**packed, **pixels, "position_ids": None, "attention_mask": torch.ones_like(packed["input_ids"])}
    want, _ = loss_and_grads(model, unit, {**padded, **pixels})
    wrong, _ = loss_and_grads(model, unit, naive)
    assert (wrong - want).abs() > 1e-5


def test_rows_are_filled_in_order_and_a_long_sample_gets_its_own():
    assert qwen_vl._pack_rows([5, 5, 5, 12, 3, 4], 10) == [[0, 1], [2], [3], [4, 5]]
    assert qwen_vl._pack_rows([3], 1) == [[0]]


def test_packing_is_refused_where_it_is_not_built(tiny_shards, tmp_path):
    from expblip.config import ConfigError, load_config
    from expblip.train.loop import preflight

    shards = tiny_shards["train"]
    base = [f"train.run_dir={tmp_path / 'run'}", "data.pack_tokens=256"]
    with pytest.raises(ConfigError, match=r"data.pack_tokens=256: packing is built for stage2 .* model.preset tiny "
                                          r"\(blip2\), train.stage=stage2: set data.pack_tokens=0"):
        preflight(load_config(REPO / "recipes" / "tiny_stage2.yaml", [*base, f"data.train.shards={shards}"]),
                  wait_for_storage=False)
    with pytest.raises(ConfigError, match=r"train.stage=vision: set data.pack_tokens=0"):
        preflight(load_config(RECIPE, [*base, "train.stage=vision", f"data.train.shards={shards}"]),
                  wait_for_storage=False)
    with pytest.raises(ConfigError, match=r"data.pack_tokens must be >= 0"):
        load_config(RECIPE, ["data.pack_tokens=-1"])


@pytest.mark.slow
def test_the_loop_trains_the_same_losses_packed_or_padded(tiny_shards, tmp_path):
    """Three steps of the three-task mixture (answers of 1 to 30 tokens) through the deepspeed launcher and ZeRO-3."""
    losses = {}
    for name, extra in (("padded", []), ("packed", ["data.pack_tokens=512"])):
        run = tmp_path / name
        proc = run_launcher(deepspeed_cmd(
            "--deepspeed", "ds_configs/zero3.json", "--config", str(RECIPE), f"data.train.shards={tiny_shards['train']}",
            "data.train.batch_size=16", "optim.warmup_steps=1", "train.max_steps=3", "train.log_every=1",
            "train.ckpt_every=0", "tracking.enabled=false", f"train.run_dir={run}", "tasks.describe.weight=1",
            "tasks.aus.weight=1", "tasks.emotion.weight=1", *extra, ranks=1))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ("packing: 16 samples in " in proc.stdout) == (name == "packed")  # it did pack
        losses[name] = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses["padded"]) == 3 and losses["packed"] == pytest.approx(losses["padded"], rel=1e-5)
