"""Qwen2.5-VL at dynamic resolution (model.min_pixels / model.max_pixels): each image keeps its aspect, resized to a
multiple of patch x merge px within the bounds, by the image processor's own rule, in training, evaluation, serving
and the export's processor.

- what the captioner and the stream feed equals what stock transformers' image processor makes of the same images;
- the stream gives each image its own size (the same in every epoch) and the same order as square images;
- bad settings are refused naming the key; plan.py counts images at max_pixels;
- a LoRA run on faces of five shapes, stopped on 2 ranks, resumes on 1 and continues exactly; on square faces,
  bounds that keep them square train the very losses of the square path;
- its export: describe.py's caption is stock transformers' (the exported processor resizes as training did), the
  evaluator scores the mixed-size faces, the server and its OpenAI API answer at the image's own size, and the
  batching queue batches images of several sizes together.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from conftest import REPO, ask_openai_api, deepspeed_cmd, read_keys, read_metrics, run_launcher
from PIL import Image

RECIPE = REPO / "recipes" / "tiny_qwen_vl.yaml"
ZERO3 = "ds_configs/zero3.json"
BOUNDS = (256, 4096, 16)  # the tiny preset: patch 8 x merge 2; 1 to 16 LM tokens per image
SHAPES = [(64, 64), (80, 48), (48, 80), (96, 64), (64, 96)]  # (width, height) of the mixed faces, in turn
MAX_STEPS, STOPPED_AT, EPOCH = 6, 4, 128  # two shards of 64: 8 steps of 2 ranks x 8 an epoch


def mixed_faces(n: int, seed: int, split: str):
    """Synthetic faces resized to SHAPES in turn (records for write_shards)."""
    from expblip.data.synthetic import synthetic_records

    for i, record in enumerate(synthetic_records(n, seed=seed, split=split)):
        record["image"] = record["image"].resize(SHAPES[i % len(SHAPES)], Image.Resampling.BICUBIC)
        yield record


def write_mixed(root, name: str, n: int, split: str, per_shard: int = 64):
    from expblip.data.shards import write_shards

    write_shards(mixed_faces(n, 0, split), str(root / name), samples_per_shard=per_shard, progress=False)
    return root / name


def noise_images(sizes, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for h, w in sizes]


# ---------------------------------------------------------------------------------------------- fast: the pieces


def test_what_the_captioner_feeds_is_what_stock_transformers_processor_makes():
    """Non-square images: the captioner's preprocessing + the family's pixel_inputs give the image processor's own
    pixel_values and image_grid_thw (a Qwen2VLImageProcessor with the same min/max pixels), value for value."""
    from expblip.infer.captioner import preprocess_images
    from expblip.model import qwen_vl
    from expblip.pixels import CLIP_MEAN, CLIP_STD

    images = noise_images([(64, 64), (48, 80), (100, 37), (30, 200), (20, 20)])
    tokenizer = qwen_vl.tiny_tokenizer(["the brow raiser", "lips part"] * 8, 300)
    processor = qwen_vl.make_processor(tokenizer, *BOUNDS[:2])
    want_values, want_grid = qwen_vl.preprocess(processor, images)
    ours = preprocess_images(images, 64, CLIP_MEAN, CLIP_STD, BOUNDS)
    assert [tuple(p.shape[-2:]) for p in ours] == [(64, 64), (48, 80), (96, 32), (16, 160), (16, 16)]
    got = qwen_vl.spec_pixel_inputs(qwen_vl.tiny_config(tokenizer), ours)
    assert torch.equal(got["image_grid_thw"], want_grid)
    torch.testing.assert_close(got["pixel_values"], want_values, rtol=0, atol=1e-5)
    counts = qwen_vl.image_token_counts(got["image_grid_thw"])
    assert counts == [16, 15, 12, 10, 1] and max(counts) <= BOUNDS[1] // BOUNDS[2] ** 2


def test_the_stream_keeps_each_images_aspect_the_same_in_every_epoch_and_the_order_of_square_images(tmp_path):
    from expblip.data.stream import Cursor, StreamConfig, iterate_once, make_loader
    from expblip.pixels import dynamic_shape

    shards = write_mixed(tmp_path, "mixed", 20, "train", per_shard=10)
    want = {i: dynamic_shape(h, w, BOUNDS) for i, (w, h) in enumerate(SHAPES)}
    evaluated = next(iter(iterate_once(StreamConfig(shards=str(shards), batch_size=20, dynamic=BOUNDS))))
    assert isinstance(evaluated["pixel_values"], list)
    for key, pixels in zip(evaluated["keys"], evaluated["pixel_values"], strict=True):
        h, w = pixels.shape[-2:]
        assert (h, w) == want[int(key[-7:]) % len(SHAPES)]
        assert h % 16 == 0 and w % 16 == 0 and BOUNDS[0] <= h * w <= BOUNDS[1]
    assert evaluated["pixel_values"][0].dtype == torch.float32  # the finite pass hands normalised pixels

    from expblip.eval.evaluate import heldout_batches  # the evaluator's seeded subset regroups ragged batches
    subset = list(heldout_batches(str(shards), 64, 4, limit=7, bounds=BOUNDS))
    assert [len(b["keys"]) for b in subset] == [4, 3]
    for batch in subset:
        assert [tuple(p.shape[-2:]) for p in batch["pixel_values"]] == [
            want[int(k[-7:]) % len(SHAPES)] for k in batch["keys"]]

    def first_batches(dynamic, n=4, workers=0):
        cfg = StreamConfig(shards=str(shards), batch_size=5, lanes=2, crop_scale=0.8, dynamic=dynamic,
                           num_workers=workers)
        batches = iter(make_loader(cfg, 0, 1, cursor=Cursor(), max_outage_s=5))
        return [next(batches) for _ in range(n)]  # 20 samples: epochs 0 and 1

    dynamic, square = first_batches(BOUNDS), first_batches(())
    assert [b["keys"] for b in dynamic] == [b["keys"] for b in square]  # the order does not depend on the sizes
    workers = first_batches(BOUNDS, workers=2)  # ragged batches cross from data workers as one flat tensor each
    assert [b["keys"] for b in workers] == [b["keys"] for b in dynamic]
    assert all(torch.equal(p, q) for a, b in zip(workers, dynamic, strict=True)
               for p, q in zip(a["pixel_values"], b["pixel_values"], strict=True))
    sizes = {}
    for batch in dynamic:
        assert isinstance(batch["pixel_values"], list) and batch["pixel_values"][0].dtype == torch.uint8
        for key, pixels in zip(batch["keys"], batch["pixel_values"], strict=True):
            sizes.setdefault(key, set()).add(tuple(pixels.shape[-2:]))
    assert len(sizes) == 20 and all(len(s) == 1 for s in sizes.values())  # a crop keeps the image's size


def test_bad_dynamic_resolution_settings_are_refused_naming_the_key(tmp_path):
    from expblip.config import ConfigError, load_config

    base = [f"train.run_dir={tmp_path / 'run'}"]
    cases = (
        (["model.preset=tiny", "model.max_pixels=4096", "model.min_pixels=256"],
         r"model.min_pixels / model.max_pixels: model.preset tiny \(BLIP-2\) reads square 64-px images"),
        (["model.max_pixels=4096"], "needs both model.min_pixels and model.max_pixels"),
        (["model.min_pixels=4096", "model.max_pixels=256"],
         "model.min_pixels=4096, model.max_pixels=256 must satisfy 1 <= min_pixels <= max_pixels"),
        (["model.min_pixels=16", "model.max_pixels=200"],
         r"model.max_pixels=200 holds no 16x16-px image .* set model.max_pixels >= 256"),
        (["model.min_pixels=256", "model.max_pixels=4096", "data.train.dynamic=[256,1024,16]"],
         r"data.train.dynamic=\[256, 1024, 16\] differs from model.min_pixels / model.max_pixels"),
    )
    for overrides, message in cases:
        with pytest.raises((ConfigError, ValueError), match=message):
            load_config(RECIPE, [*base, *overrides])
    cfg = load_config(RECIPE, [*base, "model.min_pixels=256", "model.max_pixels=4096"])
    assert cfg.model.bounds == cfg.data.train.dynamic == cfg.data.eval.dynamic == BOUNDS  # one source: the model's
    assert load_config(RECIPE, base).data.train.dynamic == ()


def test_plan_counts_images_at_max_pixels(capsys):
    from conftest import launch_module

    from expblip.train.plan import PlanConfig, make_plan

    def plan(low, high):
        return make_plan(PlanConfig(preset="qwen2.5-vl-7b", trainable="all", checkpointing=("vision", "lm"),
                                    min_pixels=low, max_pixels=high))

    square, bounded, larger = plan(0, 0), plan(3136, 448 * 448), plan(3136, 1280 * 28 * 28)
    assert bounded.counts.dims == square.counts.dims  # 448 x 448 px at most: the 256 tokens of the square preset
    assert larger.counts.dims.queries == 1280 and larger.counts.dims.vit_tokens == 4 * 1280
    act = lambda p: sum(p.activations_cfg.values())  # noqa: E731
    assert act(larger) > 4 * act(square)
    assert launch_module("plan").main(["--preset", "qwen2.5-vl-7b", "--min-pixels", "3136", "--max-pixels",
                                       str(1280 * 28 * 28)]) == 0
    assert "counted at the bound: 1280 image tokens (5120 ViT patches)" in capsys.readouterr().out
    assert launch_module("plan").main(["--preset", "vitg-opt6.7b", "--min-pixels", "3136", "--max-pixels",
                                       "200704"]) == 2
    assert "reads square 224-px images" in capsys.readouterr().err


def test_the_batching_queue_batches_images_of_several_sizes_together(tiny_qwen_run_dir):
    """Three uploads of three sizes go through one generate call as a ragged batch, each answered as alone."""
    import dataclasses

    from expblip.infer.captioner import Captioner
    from expblip.model.generation import GenerationConfig
    from expblip.serve.batching import Batcher

    captioner = dataclasses.replace(Captioner.from_export(tiny_qwen_run_dir / "export"), bounds=BOUNDS)
    pixels = captioner.preprocess(noise_images([(64, 64), (48, 80), (96, 32)], seed=1))
    gen = GenerationConfig(num_beams=1, max_new_tokens=6)
    alone = [captioner.caption_pixels([p], gen)[0] for p in pixels]
    calls = []

    def caption_fn(batch, gen, prompt):
        calls.append([tuple(p.shape[-2:]) for p in batch])
        return captioner.caption_pixels(batch, gen, prompt)

    batcher = Batcher(caption_fn, max_batch=8, max_wait_s=0.5)
    try:
        together = [f.result(timeout=60) for f in batcher.submit(pixels, gen)]
    finally:
        batcher.close()
    assert calls == [[(64, 64), (48, 80), (96, 32)]] and together == alone
    with pytest.raises(ValueError, match=r"are 48x96 but the export expects 32x80; preprocess with min_pixels 256, max_pixels 4096"):
        captioner.caption_pixels([torch.zeros(3, 48, 96)], gen)  # not what this export's preprocessing makes


# ------------------------------------------------------------------------------------------- slow: a trained run


def _args(train, val, run_dir, *extra) -> list[str]:
    return ["--config", str(RECIPE), f"data.train.shards={train}", "data.train.batch_size=8",
            "model.min_pixels=256", "model.max_pixels=4096", "model.freeze_vision=true", "model.lora.towers=[vision]",
            "model.lora.r=4", "model.lora.alpha=16", "model.lora.dropout=0.0", "optim.lr=3e-3",
            "optim.warmup_steps=2", f"train.max_steps={MAX_STEPS}", "train.log_every=1",
            f"train.ckpt_every={STOPPED_AT}", "tracking.enabled=false", f"train.run_dir={run_dir}",
            "train.log_keys=true", f"data.eval.shards={val}", f"train.eval_every={MAX_STEPS}", "train.eval_generate=8",
            *extra]


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    """(root, run dir): a LoRA run on faces of five shapes, 2 ranks to step 4, then 1 rank to step 6."""
    from test_world_size import _resume_cmd

    root = tmp_path_factory.mktemp("qwen_dynamic")
    train, val = write_mixed(root, "train", EPOCH, "train"), write_mixed(root, "val", 16, "val", per_shard=16)
    run = root / "run"
    proc = run_launcher(deepspeed_cmd("--deepspeed", ZERO3, *_args(train, val, run, f"train.stop_after={STOPPED_AT}"),
                                      ranks=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(run / "checkpoints", root / "stopped")
    proc = run_launcher(_resume_cmd(*_args(train, val, run), f"--dump={root / 'restored'}", ranks=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"start step {STOPPED_AT}" in proc.stdout and "written by 2 ranks and this run has 1" in proc.stdout
    return root, run


@pytest.mark.slow
def test_a_lora_run_on_faces_of_five_shapes_stopped_on_two_ranks_resumes_on_one_and_continues_exactly(dynamic_run):
    root, run = dynamic_run
    saved = torch.load(root / "stopped" / f"step{STOPPED_AT:08d}" / "elastic.pt", weights_only=True)
    restored = torch.load(root / "restored" / "elastic.pt", weights_only=True)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == restored[key].keys() and saved[key], key
        assert all(torch.equal(saved[key][k], restored[key][k]) for k in saved[key]), key
    assert restored["optimizer_step"] == saved["optimizer_step"] == STOPPED_AT
    keys = read_keys(run)
    assert sorted(keys) == list(range(1, MAX_STEPS + 1))
    seen = [k for s in sorted(keys) for k, e in keys[s] if e == 0]
    # 8 samples per rank a step: 2 ranks to step 4, 1 after; the epoch goes on where it stopped, no sample twice
    assert len(seen) == len(set(seen)) == STOPPED_AT * 16 + (MAX_STEPS - STOPPED_AT) * 8
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == MAX_STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    config = json.loads((run / "export" / "config.json").read_text())
    assert (config["expblip_min_pixels"], config["expblip_max_pixels"]) == BOUNDS[:2]
    size = json.loads((run / "export" / "preprocessor_config.json").read_text())["size"]
    assert size == {"shortest_edge": BOUNDS[0], "longest_edge": BOUNDS[1]}  # stock transformers resizes as we did


@pytest.mark.slow
def test_on_square_faces_bounds_that_keep_them_square_train_the_losses_of_the_square_path(tiny_shards, tmp_path):
    """The ragged path (a list per batch, patchified per image, image tokens per image) against the square one."""
    losses = {}
    for name, bounds in (("square", []), ("dynamic", ["model.min_pixels=256", "model.max_pixels=4096"])):
        run = tmp_path / name
        proc = run_launcher(deepspeed_cmd(
            "--deepspeed", ZERO3, "--config", str(RECIPE), f"data.train.shards={tiny_shards['train']}",
            "data.train.batch_size=8", "optim.warmup_steps=1", "train.max_steps=3", "train.log_every=1",
            "train.ckpt_every=0", "tracking.enabled=false", f"train.run_dir={run}", *bounds,
            ranks=1))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[name] = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses["square"]) == 3 and losses["dynamic"] == pytest.approx(losses["square"], rel=1e-6)


@pytest.mark.slow
def test_describe_gives_stock_transformers_caption_for_faces_of_other_shapes(dynamic_run, tmp_path):
    """launch/describe.py's greedy captions of non-square faces equal stock transformers' (AutoModelForImageTextToText,
    AutoImageProcessor, AutoTokenizer and the exported chat template), one image at a time on that side."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    _, run = dynamic_run
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, record in enumerate(mixed_faces(5, 9, "val")):
        record["image"].save(faces / f"{i}.png")
    proc = run_launcher([sys.executable, "launch/describe.py", "--model", str(run), "--beams", "1",
                         "--max-new-tokens", "12", "--json", str(faces)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [json.loads(line)["caption"] for line in proc.stdout.splitlines() if line.startswith("{")]

    export = run / "export"
    stock = AutoModelForImageTextToText.from_pretrained(export).eval()
    tok, image_processor = AutoTokenizer.from_pretrained(export), AutoImageProcessor.from_pretrained(export)
    template = (export / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    theirs, grids = [], []
    for i in range(5):
        pixels = image_processor(images=[Image.open(faces / f"{i}.png").convert("RGB")], return_tensors="pt")
        grids.append(pixels["image_grid_thw"][0].tolist())
        ids = tok([text.replace("<|image_pad|>", "<|image_pad|>" * (int(pixels["image_grid_thw"].prod()) // 4))],
                  return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = stock.generate(**ids, **pixels, mm_token_type_ids=(ids["input_ids"] == tok.image_token_id).int(),
                                 num_beams=1, do_sample=False, max_new_tokens=12, min_new_tokens=3)
        theirs.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert grids == [[1, 8, 8], [1, 6, 10], [1, 10, 6], [1, 6, 8], [1, 8, 6]]  # (H, W) / 8 px: the five shapes
    assert len(ours) == 5 and all(ours) and ours == theirs

    # A 6-step model's captions say little, so the next-token logits say it: the captioner's input gives stock
    # transformers' logits, and the same face squeezed to a square (what a square-only path feeds) does not
    from expblip.infer.captioner import Captioner
    from expblip.model import qwen_vl

    captioner = Captioner.from_export(run / "export")
    image = Image.open(faces / "1.png").convert("RGB")  # 80 x 48 px

    def logits(pixels, grid):
        ids = qwen_vl.generation_inputs(captioner.tokenizer, grid)
        with torch.no_grad():
            return stock(**ids, pixel_values=pixels, image_grid_thw=grid).logits[0, -1]

    theirs = logits(*image_processor(images=[image], return_tensors="pt").values())
    ours = qwen_vl.spec_pixel_inputs(stock.config, captioner.preprocess([image]))
    squeezed = qwen_vl.spec_pixel_inputs(stock.config, captioner.preprocess([image.resize((64, 64))]))
    torch.testing.assert_close(logits(ours["pixel_values"], ours["image_grid_thw"]), theirs, rtol=0, atol=1e-4)
    assert (logits(squeezed["pixel_values"], squeezed["image_grid_thw"]) - theirs).abs().max() > 1e-3


@pytest.mark.slow
def test_the_evaluator_scores_faces_of_other_shapes_and_the_openai_api_counts_their_own_tokens(dynamic_run, tmp_path):
    import io

    from expblip.infer.captioner import Captioner
    from expblip.model.generation import GenerationConfig

    root, run = dynamic_run
    out = tmp_path / "eval"
    proc = run_launcher([sys.executable, "launch/evaluate.py", "--model", str(run), "--shards", str(root / "val"),
                         "--train-shards", str(root / "train"), "--beams", "1", "--max-new-tokens", "12",
                         "--no-caption-metrics", "--no-progress", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["key"] for s in metrics["samples"]] == [f"synthetic-val-0-{i:07d}" for i in range(16)]
    assert "mean_au_f1" in metrics["model"] and metrics["best"]["mean_au_f1"]["constant"]  # beside its baseline

    captioner = Captioner.from_export(run / "export")
    assert captioner.bounds == BOUNDS
    gen = GenerationConfig(num_beams=1, max_new_tokens=12)
    wide = next(iter(mixed_faces(2, 4, "val")))["image"].resize((96, 48))  # 48 x 96 = 4,608 px > max_pixels
    want_size = (32, 80)  # scaled down, aspect kept: 2 x 5 = 10 image tokens instead of the 16 at most
    buffer = io.BytesIO()
    wide.save(buffer, "PNG")
    want = captioner.caption_pixels(captioner.preprocess([wide]), gen, with_lengths=True)[0]
    assert tuple(captioner.preprocess([wide])[0].shape[-2:]) == want_size
    answer = ask_openai_api(captioner, buffer.getvalue(), gen)
    assert answer.choices[0].message.content == want.text
    assert answer.usage.prompt_tokens == captioner.prompt_length("", want_size) == captioner.prompt_length() - 6


# ------------------------------------------------------------------------------ fast: aspects, crops, stale bounds


def test_a_training_crop_of_a_wide_image_keeps_its_aspect():
    """At dynamic resolution a crop is resized to the whole image's aspect: its box is drawn around that aspect and
    falls back to the whole image, never to torchvision's centred square (stretched 1.75x for a 112 x 64 face)."""
    import random

    from expblip.data.stream import crop_box

    boxes = [crop_box(112, 64, random.Random(seed), (0.8, 1.0), keep_aspect=True) for seed in range(300)]
    aspects = [(r - left) / (b - t) for left, t, r, b in boxes]
    assert min(aspects) >= 0.75 * 1.75 - 0.05 and max(aspects) <= 4 / 3 * 1.75 + 0.05
    assert all(r - left > 64 for left, _, r, _ in boxes)  # no square fallback
    square = [crop_box(112, 64, random.Random(seed), (0.8, 1.0)) for seed in range(300)]  # square path: as before
    assert sum((r - left) == (b - t) == 64 for left, t, r, b in square) > 100


def test_an_aspect_the_bounds_cannot_hold_is_skipped_by_the_stream_refused_by_describe_and_the_server(
        tmp_path, tiny_qwen_run_dir):
    import dataclasses

    from test_serve import png_bytes, post_file

    from expblip.data.shards import write_shards
    from expblip.data.stream import StreamConfig, iterate_once
    from expblip.infer.captioner import Captioner, ImageError, describe_files
    from expblip.pixels import AspectError, dynamic_shape
    from expblip.serve.app import background_server, create_app

    with pytest.raises(AspectError, match=r"a 267x11 px image cannot keep its aspect within min_pixels=256 and "
                                          r"max_pixels=4096"):
        dynamic_shape(11, 267, BOUNDS)  # smart_resize gives 16 x 304 = 4,864 px: above the bound
    records = list(mixed_faces(4, 0, "train"))
    records[1]["image"] = records[1]["image"].resize((267, 11))
    write_shards(records, str(tmp_path / "odd"), samples_per_shard=4, progress=False)
    batches = list(iterate_once(StreamConfig(shards=str(tmp_path / "odd"), batch_size=4, dynamic=BOUNDS)))
    assert [k for b in batches for k in b["keys"]] == [r["key"] for i, r in enumerate(records) if i != 1]
    assert batches[-1]["errors"] == {"bad_aspect": 1}  # skipped, counted, reported

    captioner = dataclasses.replace(Captioner.from_export(tiny_qwen_run_dir / "export"), bounds=BOUNDS)
    strip = tmp_path / "strip.png"
    records[1]["image"].save(strip)
    with pytest.raises(ImageError, match=r"strip.png: a 267x11 px image cannot keep its aspect"):
        list(describe_files(captioner, [strip]))
    with background_server(create_app(captioner)) as url:
        status, body = post_file(f"{url}/describe", png_bytes(records[1]["image"]), filename="strip.png")
    assert status == 400 and "strip.png: a 267x11 px image cannot keep its aspect" in json.dumps(body)


def test_a_square_run_from_a_dynamic_runs_weights_forgets_its_bounds(tmp_path):
    """model.weights' config.json may carry an earlier run's bounds: the new run's own resolution replaces them."""
    from expblip.model import qwen_vl
    from expblip.model.blip2 import ModelConfig

    config = qwen_vl.published_config("qwen2.5-vl-3b")
    config.expblip_min_pixels, config.expblip_max_pixels = 50176, 200704
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        square = qwen_vl.spec_build(ModelConfig(preset="qwen2.5-vl-3b", weights=str(tmp_path)), None)
        dynamic = qwen_vl.spec_build(ModelConfig(preset="qwen2.5-vl-3b", weights=str(tmp_path), min_pixels=3136,
                                                 max_pixels=100352), None)
    assert qwen_vl.image_bounds(square.config) == () and qwen_vl.image_tokens(square.config) == 256  # 448 px
    assert qwen_vl.image_bounds(dynamic.config) == (3136, 100352, 28) and qwen_vl.image_tokens(dynamic.config) == 128


def test_the_export_writes_the_models_bounds_into_a_processor_made_with_others(tmp_path):
    """A published preset's processor comes from its directory with the published bounds; the export rewrites them
    to the run's, so stock transformers resizes as training did."""
    from expblip.model import qwen_vl

    tokenizer = qwen_vl.tiny_tokenizer(["the brow raiser"] * 8, 300)
    processor = qwen_vl.make_processor(tokenizer, 3136, 12845056)  # the published defaults
    model = qwen_vl.build_model(tokenizer)
    model.config.expblip_min_pixels, model.config.expblip_max_pixels = BOUNDS[:2]
    out = qwen_vl.spec_save_export(model.state_dict(), model.config, processor, tmp_path / "export")
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {
        "shortest_edge": BOUNDS[0], "longest_edge": BOUNDS[1]}
    reread = qwen_vl.load_processor(out).image_processor
    assert (reread.size["shortest_edge"], reread.size["longest_edge"]) == BOUNDS[:2]
