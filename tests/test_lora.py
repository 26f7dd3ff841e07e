"""Modern LM families, LoRA and their exports: tiny Qwen2.5 / Llama-3 presets, adapters on a frozen LM (a small
fraction of it trains), the trainable export, merging, plan.py's adapter counts, and (slow) a LoRA run under ZeRO-3
that resumes exactly and whose merged export stock transformers serves with the same captions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_cmd, launch_module, read_keys, read_metrics, run_launcher

from expblip.data.synthetic import synthetic_records
from expblip.model.blip2 import ModelConfig, apply_freezing, build_model, caption_inputs
from expblip.model.family import FAMILIES, IMAGE_TOKEN
from expblip.model.lora import LoraSettings, base_name, is_adapter, merge_adapters
from expblip.model.tokenizer import caption_end_id, image_token_id, train_caption_tokenizer

CAPTIONS = [c for r in synthetic_records(40, seed=1) for c in r["captions"]]
TINY = {"tiny": "opt", "tiny-qwen2.5": "qwen2", "tiny-llama3": "llama"}
PROMPT = "List the active action units."


def tiny(preset: str, lora: LoraSettings | None = None, seed: int = 0):
    """(model, tokenizer) of a tiny preset, its tokenizer trained in the preset's family conventions."""
    tok = train_caption_tokenizer(CAPTIONS + [PROMPT], vocab_size=300, family=TINY[preset])
    torch.manual_seed(seed)
    cfg = ModelConfig(preset=preset, dropout=0.0, lora=lora or LoraSettings())  # type: ignore[arg-type]
    return build_model(cfg, tok), tok, cfg


@pytest.mark.parametrize("preset", list(TINY))
def test_tiny_preset_of_each_family_ends_captions_and_lays_out_prompts_as_its_family(preset):
    model, tok, _ = tiny(preset)
    family = FAMILIES[TINY[preset]]
    assert model.config.text_config.model_type == family.name
    end = tok.convert_tokens_to_ids(family.caption_end) if family.name != "opt" else tok("\n")["input_ids"][-1]
    assert caption_end_id(tok) == end == model.config.text_config.eos_token_id
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_index
    if family.image_slot:  # Llama-3: <image> takes a reserved token's id, no new embedding row
        assert image_token_id(tok) == list(family.tiny_special_tokens).index(family.image_slot)

    caption = CAPTIONS[0]
    inputs = caption_inputs(tok, [caption, caption], num_query=8, max_tokens=40, prompts=[PROMPT, ""])
    ids, labels = inputs["input_ids"], inputs["labels"]
    prompted = tok.decode(ids[0][: (labels[0] != -100).nonzero()[0].item()])
    bos = family.bos or ""
    assert prompted == IMAGE_TOKEN * 8 + bos + family.prompt_text(PROMPT)  # the family's chat turn (OPT: as is)
    plain = tok.decode(ids[1][: (labels[1] != -100).nonzero()[0].item()])
    assert plain == IMAGE_TOKEN * 8 + bos  # no instruction: the paper's prompt
    for label in labels:
        answer = label[label != -100]
        assert answer[-1].item() == end  # every caption ends with the family's end token, which counts in the loss
        assert tok.decode(answer[:-1]).strip() == caption.strip()
    # the model takes the batch: one loss over the answer tokens only (the prompt does not count, see below)
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    assert torch.isfinite(model(**inputs, pixel_values=pixels).loss)


def test_the_loop_masks_each_task_prompt_and_trains_its_answer():
    """The loop's own batch building with a three-task mixture: every prompt token is -100, the labels spell the
    task's answer (AU names, an emotion, the caption) and its end token, and the mixture uses all three tasks."""
    from types import SimpleNamespace

    from expblip.config import load_config
    from expblip.data.tasks import au_answer, emotion_answer
    from expblip.model.blip2 import blip2_config
    from expblip.train.loop import model_inputs

    cfg = load_config(None, ["model.preset=tiny-qwen2.5", "train.stage=lm", "tasks.aus.weight=1",
                             "tasks.emotion.weight=1", "tasks.describe.weight=1"])
    records = list(synthetic_records(24, seed=3))
    from expblip.data.tasks import task_vocabulary

    tok = train_caption_tokenizer(CAPTIONS + task_vocabulary(cfg.tasks), vocab_size=400, family="qwen2")
    run = SimpleNamespace(cfg=cfg, step=5, tokenizer=tok, blip2_config=blip2_config(cfg.model, tok),
                          engine=SimpleNamespace(device=torch.device("cpu")))
    batch = {"captions": [r["captions"][0] for r in records], "labels": [r["labels"] for r in records],
             "keys": [f"face-{i}" for i in range(len(records))]}
    inputs = model_inputs(run, batch)
    prompts = {v: k for k, v in cfg.tasks.prompts().items()}
    seen = set()
    for ids, labels, caption, lab in zip(inputs["input_ids"], inputs["labels"], batch["captions"], batch["labels"],
                                         strict=True):
        first = (labels != -100).nonzero()[0].item()
        head = tok.decode(ids[:first])
        asked = [task for prompt, task in prompts.items() if prompt and prompt in head] or ["describe"]
        task = asked[0]
        seen.add(task)
        assert (labels[:first] == -100).all() and (labels[first:] != -100).sum() == (ids[first:] != tok.pad_token_id
                                                                                      ).sum()
        if task == "aus":
            want = au_answer(lab["aus"])
        elif task == "emotion":
            want = emotion_answer(lab["emotions"])
        else:
            want = caption.strip()
        answer = labels[labels != -100]
        assert tok.decode(answer[:-1]).strip() == want and answer[-1].item() == caption_end_id(tok)
    assert seen == {"describe", "aus", "emotion"}


def test_recipe_lora_trains_under_a_tenth_of_the_lm_and_leaves_its_weights_frozen():
    from expblip.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "tiny_qwen_lora.yaml",
                      ["model.weights=", "model.freeze_vision=true"])
    assert cfg.model.preset == "tiny-qwen2.5" and tuple(cfg.model.lora.towers) == ("lm",)
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=cfg.model.tokenizer_vocab, family="qwen2")
    model = build_model(cfg.model, tok)
    apply_freezing(model, cfg.model, cfg.train.stage)
    lm = {n: p for n, p in model.language_model.named_parameters()}
    base = sum(p.numel() for n, p in lm.items() if not is_adapter(n))
    trained = {n: p for n, p in lm.items() if p.requires_grad}
    assert trained and all(is_adapter(n) for n in trained)  # the LM's own weights stay frozen
    fraction = sum(p.numel() for p in trained.values()) / base
    assert 0.01 < fraction <= 0.10, fraction
    # adapters on the family's 7 projections of both layers (A and B each)
    layers = {re.sub(r"\.lora_[AB]\..*", "", n) for n in trained}
    assert len(layers) == 7 * model.config.text_config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(FAMILIES["qwen2"].lora_targets)
    # stage 2 trains the adapters beside the Q-Former, queries and projection; the ViT here is frozen
    outside = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and not is_adapter(n)}
    assert outside == {"qformer", "query_tokens", "language_projection"}


def test_trainable_export_keys_are_the_adapters_qformer_queries_and_projection():
    from expblip.config import load_config
    from expblip.model.blip2 import blip2_config
    from expblip.train.export import trainable_keys

    cfg = load_config(None, ["model.preset=tiny-qwen2.5", "train.stage=stage2", "model.lora.towers=[lm]",
                             "model.lora.r=4"])
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=300, family="qwen2")
    keys = trainable_keys(cfg, blip2_config(cfg.model, tok))
    assert {k.split(".")[0] for k in keys} == {"qformer", "query_tokens", "language_projection", "language_model"}
    lm = [k for k in keys if k.startswith("language_model.")]
    assert lm and all(is_adapter(k) for k in lm)
    assert not any(k.startswith("vision_model.") for k in keys)


def test_merged_adapters_give_the_adapter_model_s_logits_in_a_plain_blip2():
    lora = LoraSettings(towers=("lm", "qformer"), r=4, alpha=16, dropout=0.0)
    model, tok, _ = tiny("tiny-llama3", lora)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (a fresh adapter changes nothing): give the adapters something to fold
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    plain, _, _ = tiny("tiny-llama3")
    state = model.state_dict()
    merged = {k: (v.contiguous() if not isinstance(v, torch.Tensor) else v)
              for k, v in merge_adapters(state, lora.scale).items()}
    assert not any(is_adapter(k) for k in merged) and set(merged) == set(plain.state_dict())
    inputs = caption_inputs(tok, CAPTIONS[:2], num_query=8, max_tokens=20)
    pixels = torch.randn(2, 3, 64, 64)
    model.eval(), plain.eval()
    with torch.no_grad():
        want = model(**inputs, pixel_values=pixels).logits
        plain.load_state_dict({base_name(k): v for k, v in state.items() if not is_adapter(k)})
        unmerged = plain(**inputs, pixel_values=pixels).logits  # the base weights alone
        plain.load_state_dict(merged)
        got = plain(**inputs, pixel_values=pixels).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (unmerged - want).abs().max() > 1e-2  # the adapters matter: without them the logits differ


def _lora_params(text_config, r: int, targets) -> int:
    """r * (in + out) over the LM's linear layers named by `targets`, from the config's own dimensions."""
    h, layers = text_config.hidden_size, text_config.num_hidden_layers
    head = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    kv = text_config.num_key_value_heads * head
    shapes = {"q_proj": (h, text_config.num_attention_heads * head), "k_proj": (h, kv), "v_proj": (h, kv),
              "o_proj": (text_config.num_attention_heads * head, h), "gate_proj": (h, text_config.intermediate_size),
              "up_proj": (h, text_config.intermediate_size), "down_proj": (text_config.intermediate_size, h)}
    return layers * sum(r * sum(shapes[t]) for t in targets)


def test_plan_presets_table_counts_lora_adapters_of_the_new_presets(capsys):
    from expblip.model.blip2 import _LM, PRESETS

    assert launch_module("plan").main(["--presets", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == set(PRESETS)
    from transformers import LlamaConfig, Qwen2Config

    for preset, config_class in (("vitg-qwen2.5-7b", Qwen2Config), ("vitg-llama3-8b", LlamaConfig),
                                 ("vitg-llama3.2-1b", LlamaConfig)):
        family, dims = _LM[PRESETS[preset][2]]
        text = config_class(**dims)
        want = _lora_params(text, 16, FAMILIES[family].lora_targets)
        row = rows[preset]
        assert row[1] == family
        adapters_m = float(row[4].rstrip("M").replace(",", ""))
        assert adapters_m == pytest.approx(want / 1e6, abs=0.006), (preset, row, want)
        lm_m = float(row[3].rstrip("M").replace(",", ""))
        assert float(row[5].rstrip("%")) == pytest.approx(100 * adapters_m / lm_m, abs=0.01)
    # public figures for r 16 on every projection: Qwen2.5-7B 40.4M, Llama-3-8B 41.9M adapter parameters
    assert float(rows["vitg-qwen2.5-7b"][4].rstrip("M")) == pytest.approx(40.37, abs=0.01)
    assert float(rows["vitg-llama3-8b"][4].rstrip("M")) == pytest.approx(41.94, abs=0.01)


def test_plan_one_preset_with_lora_names_the_adapters(capsys):
    assert launch_module("plan").main(["--preset", "vitg-qwen2.5-7b", "--lora-r", "16"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("LoRA r=16"))
    assert "lm 40.37M adapters (0.53% of the lm)" in line, line


# ---------------------------------------------------------------- a LoRA run under ZeRO-3 (slow)

STOCK_GREEDY = r"""
import json, sys
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

export, images = sys.argv[1], sys.argv[2:]
processor = Blip2Processor.from_pretrained(export)
model = Blip2ForConditionalGeneration.from_pretrained(export).eval()
# text "": transformers' Blip2 generate() without input_ids starts from image tokens + BOS, and Qwen2.5 has no BOS
inputs = processor(images=[Image.open(p) for p in images], text=[""] * len(images), return_tensors="pt")
with torch.no_grad():
    ids = model.generate(**inputs, generation_config=model.generation_config, num_beams=1, do_sample=False,
                         max_new_tokens=12, min_new_tokens=1)
captions = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"captions": [c.strip() for c in captions], "pixel_values": inputs["pixel_values"].tolist(),
                  "expblip_imported": any(m.startswith("expblip") for m in sys.modules)}))
"""
LORA = ["model.lora.towers=[lm]", "model.lora.r=4", "model.lora.alpha=16", "model.lora.dropout=0.0"]


@pytest.fixture(scope="module")
def qwen_init(tiny_shards, tmp_path_factory) -> Path:
    """A random tiny Qwen2.5-family BLIP-2 + a Qwen-style tokenizer trained on the shards' captions (one export), and
    beside it the same weights as a run on a modern LM starts from: `towers/blip2` (ViT, Q-Former, queries; no LM,
    no projection) and `towers/qwen` (the LM as Qwen2ForCausalLM.save_pretrained writes it, with its tokenizer)."""
    from safetensors.torch import save_file

    from expblip.data.stream import StreamConfig, iterate_once
    from expblip.model.weights import export_hf

    captions = [c for b in iterate_once(StreamConfig(shards=str(tiny_shards["train"]))) for c in b["captions"]]
    tok = train_caption_tokenizer(captions, vocab_size=256, family="qwen2")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-qwen2.5"), tok)
    root = tmp_path_factory.mktemp("qwen_init")
    (root / "towers" / "blip2").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not k.startswith(("language_model.", "language_projection."))},
              str(root / "towers" / "blip2" / "model.safetensors"))
    model.language_model.save_pretrained(root / "towers" / "qwen")
    tok.save_pretrained(root / "towers" / "qwen")
    return export_hf(model.state_dict(), model.config, tok, root / "export")


def towers_of(qwen_init: Path) -> tuple[Path, Path]:
    return qwen_init.parent / "towers" / "blip2", qwen_init.parent / "towers" / "qwen"


def lora_args(tiny_shards, qwen_init, run_dir) -> list[str]:
    """The LM from its own directory (its tokenizer is the run's), the ViT and Q-Former from a BLIP-2 without one;
    the projection starts new."""
    blip2, qwen = towers_of(qwen_init)
    return [f"data.train.shards={tiny_shards['train']}", "data.train.batch_size=8", f"model.weights={blip2}",
            f"model.lm_weights={qwen}", "model.allow_missing=[language_projection.**]",
            "model.preset=tiny-qwen2.5", "model.dropout=0.0", *LORA, "optim.lr=1e-2", "optim.min_lr=1e-3",
            "optim.warmup_steps=2", "train.max_steps=8", "train.log_every=1", "train.ckpt_every=4",
            "train.export=both", "tracking.experiment=lora", f"train.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def lora_run(tiny_shards, qwen_init, tmp_path_factory) -> Path:
    """8 steps of a LoRA stage 2 on 2 CPU ranks under ZeRO-3 (~1-2 min here)."""
    run_dir = tmp_path_factory.mktemp("lora_full")
    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *lora_args(tiny_shards, qwen_init,
                                                                                          run_dir)), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def adapters_of(run_dir: Path) -> dict[str, torch.Tensor]:
    from expblip.model.weights import read_trainable_export

    trained, _ = read_trainable_export(run_dir / "export-trainable")
    return {k: v for k, v in trained.items() if is_adapter(k)}


@pytest.mark.slow  # ~1-2 min: the run fixture (shared with the tests below)
def test_lora_run_trains_the_adapters_only_and_records_them(lora_run, qwen_init):
    import mlflow

    from expblip.model.weights import read_state, read_trainable_export

    losses = [m["loss"] for m in read_metrics(lora_run)]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    trained, meta = read_trainable_export(lora_run / "export-trainable")
    assert meta["lora"]["r"] == 4 and meta["lora"]["scale"] == 4.0
    lm = [k for k in trained if k.startswith("language_model.")]
    assert lm and all(is_adapter(k) for k in lm)  # the LM's own weights are only fingerprinted
    assert {k.split(".")[0] for k in trained} == {"qformer", "query_tokens", "language_projection", "language_model"}
    assert all(trained[k].abs().max() > 0 for k in lm if ".lora_B." in k)  # B left zero: they trained
    init = read_state(qwen_init)
    frozen = [k for k in meta["frozen"] if k.startswith("language_model.")]
    assert set(frozen) <= set(init) and len(frozen) > 7 * 2  # under transformers' names, what --merge matches
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{lora_run / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("lora").experiment_id])[0]
    assert run.data.params["model.lora.r"] == "4" and "lm" in run.data.params["model.lora.towers"]


@pytest.mark.slow  # ~2-3 min: two more runs of the fixture's size
def test_stopped_lora_run_resumes_with_the_same_adapters_and_trajectory(lora_run, tiny_shards, qwen_init, tmp_path):
    args = lora_args(tiny_shards, qwen_init, tmp_path)
    first = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args, "train.stop_after=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    second = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "start step 4" in second.stdout + second.stderr
    resumed, reference = read_metrics(tmp_path), read_metrics(lora_run)
    assert [m["step"] for m in resumed] == list(range(1, 9))  # continues at 5, nothing repeated
    for got, want in zip(resumed, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), (got["step"], got, want)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)
    a, b = adapters_of(tmp_path), adapters_of(lora_run)
    assert set(a) == set(b) and a
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst < 1e-3, worst  # same adapters, up to the float order of the gloo all-reduce


@pytest.mark.slow  # ~40 s: one single-rank run from the fixture's step-4 checkpoint
def test_lora_run_resumed_at_another_world_size_continues_from_its_adapters(lora_run, tiny_shards, qwen_init,
                                                                            tmp_path):
    """The fixture's 2-rank checkpoint at step 4, resumed by one rank: it starts from exactly the trainable weights
    (adapters, Q-Former, projection) the two ranks saved, continues at step 5 on the samples the two ranks had not
    read, and its loss keeps falling."""
    import hashlib
    import shutil

    from expblip.data.stream import StreamConfig, make_loader
    from expblip.train.checkpoint import read_elastic

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir, ignore=shutil.ignore_patterns("step00000008", "export*"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    saved = read_elastic(run_dir, "step00000004", 0)["fp32"]  # the trainable fp32 masters, as rank 0 wrote them
    assert any(is_adapter(k) for k in saved)
    digest = hashlib.sha256()  # checkpoint.trainable_digest's recipe, over the saved state
    for name in sorted(saved):
        digest.update(name.encode())
        digest.update(memoryview(saved[name].to(torch.float32).contiguous().view(-1).numpy()))

    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json",
                                      *lora_args(tiny_shards, qwen_init, run_dir), "train.log_keys=true", ranks=1),
                        timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resized from 2 to 1 ranks at step 4" in out, out[-3000:]
    assert f"trainable weights restored at step 4: sha256 {digest.hexdigest()[:16]}" in out, out[-3000:]
    resumed, reference = read_metrics(run_dir), read_metrics(lora_run)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["lr"] for m in resumed] == pytest.approx([m["lr"] for m in reference], rel=1e-6)  # one schedule
    assert sum(m["loss"] for m in resumed[-2:]) < sum(m["loss"] for m in resumed[:2])
    keys = read_keys(run_dir)  # one rank of 8 a step now: the epoch goes on where the two ranks' 64 samples ended
    loader = iter(make_loader(StreamConfig(shards=str(tiny_shards["train"]), batch_size=8), 0, 1))
    order = [next(loader)["keys"] for _ in range(12)]  # the global order, 8 at a time
    assert [[k for k, _ in keys[s]] for s in sorted(keys)] == order[8:]
    a = adapters_of(run_dir)
    assert set(a) == set(adapters_of(lora_run)) and all(a[k].abs().max() > 0 for k in a if ".lora_B." in k)


@pytest.mark.slow  # ~45 s: two steps under Ray Train
def test_lora_under_the_ray_launcher_takes_the_same_first_steps(lora_run, tiny_shards, qwen_init, tmp_path):
    """The other launcher: Ray Train's two workers run the LoRA stage 2 (towers from their own directories) and take
    the deepspeed launcher's first two steps."""
    import sys

    proc = run_launcher([sys.executable, "launch/pretrain.py", *lora_args(tiny_shards, qwen_init, tmp_path),
                         "train.stop_after=2", "ray.num_workers=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = read_metrics(tmp_path), read_metrics(lora_run)[:2]
    assert [m["step"] for m in got] == [1, 2]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-4)


@pytest.mark.slow  # ~30 s on top of the run fixture
def test_merged_lora_export_gives_the_adapter_model_s_greedy_captions_in_stock_transformers(lora_run, qwen_init,
                                                                                            tmp_path, capsys):
    import subprocess
    import sys

    from expblip.model.blip2 import GenerationConfig, generate_captions
    from expblip.model.tokenizer import load_tokenizer
    from expblip.model.weights import read_state, read_trainable_export

    blip2, qwen = towers_of(qwen_init)
    assert launch_module("export").main(["--merge", str(lora_run / "export-trainable"), "--towers", str(blip2),
                                         "--lm-weights", str(qwen), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    merged, init = read_state(tmp_path / "merged"), read_state(qwen_init)
    assert not any(is_adapter(k) for k in merged)
    folded = [k for k in init if k.startswith("language_model.") and not torch.equal(init[k], merged[k])]
    assert len(folded) == 7 * 2  # every adapted projection of both layers holds W + alpha/r * B @ A

    faces = []
    for i, record in enumerate(synthetic_records(4, seed=7, split="test")):
        faces.append(tmp_path / f"face{i}.png")
        record["image"].save(faces[-1])
    proc = subprocess.run([sys.executable, "-c", STOCK_GREEDY, str(tmp_path / "merged"), *map(str, faces)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stock["expblip_imported"] is False

    # the adapter model: the towers, the adapters unmerged beside them, and the trained Q-Former / projection
    tok = load_tokenizer(qwen_init)
    model = build_model(ModelConfig(preset="tiny-qwen2.5", lora=LoraSettings(towers=("lm",), r=4, alpha=16,
                                                                             dropout=0.0)), tok)
    trained, _ = read_trainable_export(lora_run / "export-trainable")
    state = model.state_dict()
    values = {k: trained.get(k, init.get(base_name(k))) for k in state}
    missing = model.load_state_dict({k: v for k, v in values.items() if v is not None}, strict=False).missing_keys
    assert set(missing) <= {"language_model.lm_head.weight"}  # tied to the embedding, which is loaded
    pixels = torch.tensor(stock["pixel_values"])
    with torch.no_grad():
        ours = generate_captions(model.eval(), tok, pixels, GenerationConfig(num_beams=1, max_new_tokens=12,
                                                                             min_new_tokens=1))
    assert [c.strip() for c in ours] == stock["captions"], (ours, stock["captions"])
    assert any(stock["captions"])
