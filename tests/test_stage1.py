"""BLIP-2 stage 1 on the tiny preset: ITC/ITM/ITG learn, ITG's mask, the cross-rank gather, shared parameters."""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expblip.model.blip2 import CaptionModel, ModelConfig, apply_freezing, blip2_config, caption_inputs
from expblip.model.stage1 import (
    Stage1Config,
    Stage1Model,
    all_gather_with_grad,
    build_stage1,
    load_qformer_tokenizer,
    qformer_text_inputs,
    train_qformer_tokenizer,
)
from expblip.model.tokenizer import train_caption_tokenizer

VERBS = ["raises inner eyebrow", "raises outer eyebrow", "lowers brow", "raises cheek", "pulls lip corner",
         "drops jaw", "wrinkles nose", "presses lips", "raises chin", "stretches lips", "tightens lids"]
_rng = random.Random(0)
CAPTIONS = [f"It is a people who {' and '.join(_rng.sample(VERBS, _rng.randint(1, 3)))}." for _ in range(16)]
CFG = ModelConfig(dropout=0.0)


@pytest.fixture(scope="module")
def toks():
    return train_caption_tokenizer(CAPTIONS, vocab_size=300), train_qformer_tokenizer(CAPTIONS, vocab_size=256)


def tiny_stage1(toks, seed: int = 0, init_std: float = 0.2) -> Stage1Model:
    """The tiny preset with its Q-Former initialised at std init_std, ViT frozen (paper step 1).

    At the preset's 0.02 a random 64-wide Q-Former's [CLS] output barely depends on the caption (cosine 0.9999
    between captions), and ITC/ITM sit on their chance plateau for 100+ steps; 0.2 lets 40 steps show learning.
    """
    tok, qtok = toks
    torch.manual_seed(seed)
    config = blip2_config(CFG, tok)
    config.qformer_config.initializer_range = init_std
    model = build_stage1(CFG, Stage1Config(), tok, qtok, config=config)
    apply_freezing(model.blip2, CFG, "stage1")
    return model


def batch_of(toks, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 64, 64, generator=g),
            **qformer_text_inputs(toks[1], CAPTIONS[:n], max_tokens=64)}


def test_qformer_tokenizer_is_bert_style_and_reloads(toks, tmp_path):
    qtok = toks[1]
    ids = qtok(CAPTIONS[0])["input_ids"]
    assert ids[0] == qtok.cls_token_id and ids[-1] == qtok.sep_token_id and qtok.pad_token_id == 0
    assert qtok.bos_token == "[DEC]" and qtok.unk_token_id not in ids
    assert train_qformer_tokenizer(CAPTIONS, 256).get_vocab() == qtok.get_vocab()  # same on every rank
    qtok.save_pretrained(tmp_path / "qtok")
    again = load_qformer_tokenizer(tmp_path / "qtok")
    assert again(CAPTIONS[0])["input_ids"] == ids and again.bos_token_id == qtok.bos_token_id
    with pytest.raises(FileNotFoundError, match="missing-bert"):
        load_qformer_tokenizer(tmp_path / "missing-bert")


def test_each_loss_falls_on_a_fixed_batch(toks):
    model = tiny_stage1(toks)
    batch = batch_of(toks, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(40):
        out = model(**batch)
        first = first or {k: v.item() for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in model(**batch).items()}
    for name in ["loss_itc", "loss_itm", "loss_itg"]:
        assert last[name] < 0.8 * first[name], (name, first[name], last[name])
    assert last["loss_itm"] < 0.9 * 0.6365  # below the 1-in-3-positives prior: it tells pairs apart


def test_itg_mask_is_causal_over_text_and_hides_text_from_queries(toks):
    model = tiny_stage1(toks, init_std=0.02).eval()
    batch = batch_of(toks, 2)
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        image_embeds, _ = model.encode_image(batch["pixel_values"])
        logits, queries = model.itg_logits(image_embeds, ids, mask)
        k = 4  # change text token 4: logits at 0..3 (which predict tokens 1..4) must not move, later ones must
        changed = ids.clone()
        changed[:, k] = (changed[:, k] + 7) % len(toks[1])
        logits2, queries2 = model.itg_logits(image_embeds, changed, mask)
        other_text = torch.randint(6, len(toks[1]), ids.shape)
        _, queries3 = model.itg_logits(image_embeds, other_text, mask)
        other_image, _ = model.encode_image(torch.randn_like(batch["pixel_values"]))
        logits4, _ = model.itg_logits(other_image, ids, mask)
    torch.testing.assert_close(logits2[:, :k], logits[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(logits2[:, k:], logits[:, k:])
    torch.testing.assert_close(queries2, queries, rtol=0, atol=1e-6)
    torch.testing.assert_close(queries3, queries, rtol=0, atol=1e-6)
    assert not torch.allclose(logits4[:, 0], logits[:, 0])  # the text does attend to the (image) queries


def test_all_gather_with_grad_is_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _itc_worker(rank: int, port: int, model: Stage1Model, batch: dict, out: str) -> None:
    """Rank `rank` of 2 takes half of the batch (text trimmed to its own width) and reports its ITC losses."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = batch["text_ids"].shape[0] // 2
        rows = slice(rank * half, (rank + 1) * half)
        width = int(batch["text_mask"][rows].sum(1).max())
        mine = {"pixel_values": batch["pixel_values"][rows], "text_ids": batch["text_ids"][rows, :width],
                "text_mask": batch["text_mask"][rows, :width]}
        torch.manual_seed(rank)
        gathered = model(**mine, gather=all_gather_with_grad)
        gathered["loss"].backward()  # the graph through the gathered tensors is sound
        local = model(**mine)["loss_itc"]
        torch.save({"gathered": gathered["loss_itc"].item(), "local": local.item()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_itc_negatives_come_from_every_rank(toks, tmp_path):
    """Two gloo ranks with half a batch each: their ITC equals one process's ITC on the whole batch."""
    model = tiny_stage1(toks, init_std=0.02).eval()
    batch = batch_of(toks, 8)
    lengths = batch["text_mask"].sum(1)
    assert lengths[:4].max() != lengths[4:].max()  # the ranks' texts differ in width: the gather pads them
    with torch.no_grad():
        whole = model(**batch)["loss_itc"].item()
    # fork: the ranks inherit the model and the imported modules (spawn re-imports transformers: ~10 s CPU a rank)
    ranks = mp.start_processes(_itc_worker, args=(_free_port(), model, batch, str(tmp_path)), nprocs=2, join=False,
                               start_method="fork")
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=2):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 120 s")
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    gathered = sum(r["gathered"] for r in reports) / 2  # equal halves: the mean of the rank losses
    local = sum(r["local"] for r in reports) / 2
    assert gathered == pytest.approx(whole, abs=1e-5)
    assert abs(local - whole) > 1e-3  # without the gather each rank sees only its own 4 negatives


def test_stage1_trains_the_same_qformer_that_stage2_uses(toks):
    model = tiny_stage1(toks, init_std=0.02)
    blip2 = model.blip2
    weight = blip2.qformer.encoder.layer[0].attention.attention.query.weight
    before = {"qformer": weight.detach().clone(), "queries": blip2.query_tokens.detach().clone(),
              "vision": blip2.vision_model.embeddings.patch_embedding.weight.detach().clone()}
    tok = toks[0]
    captions = caption_inputs(tok, CAPTIONS[:2], num_query=blip2.config.num_query_tokens, max_tokens=32)
    pixels = torch.randn(2, 3, 64, 64)
    stage2 = CaptionModel(blip2).eval()
    with torch.no_grad():
        stage2_before = stage2(pixel_values=pixels, **captions).item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch_of(toks, 4))["loss"].backward()
    opt.step()
    assert blip2.qformer.encoder.layer[0].attention.attention.query.weight is weight  # updated in place
    assert not torch.equal(weight, before["qformer"])
    assert not torch.equal(blip2.query_tokens, before["queries"])
    assert torch.equal(blip2.vision_model.embeddings.patch_embedding.weight, before["vision"])  # frozen ViT
    with torch.no_grad():
        assert stage2(pixel_values=pixels, **captions).item() != stage2_before  # stage 2 sees the update
    stage2_keys = set(CaptionModel(blip2).state_dict())
    assert stage2_keys <= set(model.state_dict())  # one checkpoint carries both stages


def test_a_bf16_unit_computes_its_stage1_losses_in_fp32(toks):
    """Under a bf16 engine every weight and activation is bf16; ITC's logits (similarity / 0.07) reach ~14, where
    bf16's step is 0.0625, so the three cross-entropies run in fp32 (as LAVIS's under autocast)."""
    model = tiny_stage1(toks).to(torch.bfloat16)
    batch = batch_of(toks, 4)
    out = model(**{**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(("loss", "loss_itc", "loss_itm", "loss_itg"),
                                                                   torch.float32)
    out["loss"].backward()  # the gradient flows back into the bf16 weights
    assert model.blip2.query_tokens.grad is not None and model.blip2.query_tokens.grad.dtype == torch.bfloat16
