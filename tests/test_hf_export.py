"""A complete HF export: stock transformers, with no expblip import, describes a face exactly as describe.py does —
through Blip2Processor + generate and through the image-text-to-text pipeline — for a full export and for one
merged from a trainable-only export (launch/export.py --merge)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_module, make_tiny_export

from expblip.data.synthetic import synthetic_records
from expblip.pixels import CLIP_MEAN, CLIP_STD

# Stock transformers only. Blip2ForConditionalGeneration.generate hands over to language_model.generate, which reads
# the language model's generation config rather than the export's generation_config.json (transformers 5.24): the
# export's own config is passed on explicitly. Blip2Processor.__init__ drops the chat template it is loaded with, so
# the chat test puts chat_template.jinja back on the processor.
STOCK = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2Processor, pipeline

export, image_path = sys.argv[1], sys.argv[2]
image = Image.open(image_path)
processor = Blip2Processor.from_pretrained(export)
model = Blip2ForConditionalGeneration.from_pretrained(export).eval()
with torch.no_grad():
    ids = model.generate(**processor(images=image, return_tensors="pt"), generation_config=model.generation_config)
by_processor = processor.decode(ids[0], skip_special_tokens=True).strip()

pipe = pipeline("image-text-to-text", model=export)
generate_kwargs = {"generation_config": pipe.model.generation_config}
by_pipeline = pipe(images=image, text="", generate_kwargs=generate_kwargs)[0]["generated_text"].strip()
pipe.processor.chat_template = open(f"{export}/chat_template.jinja").read()
chat = [{"role": "user", "content": [{"type": "image", "image": image}]}]
by_chat = pipe(text=chat, generate_kwargs=generate_kwargs)[0]["generated_text"][-1]["content"].strip()
print(json.dumps({"processor": by_processor, "pipeline": by_pipeline, "chat": by_chat,
                  "auto_processor": type(AutoProcessor.from_pretrained(export)).__name__,
                  "generation": {k: getattr(model.generation_config, k) for k in ("num_beams", "max_new_tokens",
                                                                                 "eos_token_id")},
                  "expblip_imported": any(m.startswith("expblip") for m in sys.modules)}))
"""


def stock_captions(export: Path, image: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", STOCK, str(export), str(image)], cwd=image.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe_py_caption(export: Path, image: Path, capsys) -> str:
    assert launch_module("describe").main(["--model", str(export), str(image), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["caption"]


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("face") / "face.png"
    next(synthetic_records(1, seed=5, split="test"))["image"].save(path)
    return path


def test_export_holds_processor_tokenizer_generation_and_chat_files(tiny_run_dir):
    export = tiny_run_dir / "export"
    processor = json.loads((export / "processor_config.json").read_text())
    image = processor["image_processor"]
    assert processor["processor_class"] == "Blip2Processor" and processor["num_query_tokens"] == 8
    assert image["size"] == {"height": 64, "width": 64} and image["resample"] == 3  # bicubic
    assert image["image_mean"] == list(CLIP_MEAN) and image["image_std"] == list(CLIP_STD)
    generation = json.loads((export / "generation_config.json").read_text())
    meta = json.loads((export / "expblip.json").read_text())
    assert generation["eos_token_id"] == meta["caption_end_id"] and generation["num_beams"] == 5
    assert "bos_token" in (export / "chat_template.jinja").read_text()
    assert "image_token" not in json.loads((export / "tokenizer_config.json").read_text())


def test_stock_transformers_gives_describe_py_caption(tiny_run_dir, face, capsys):
    export = tiny_run_dir / "export"
    stock = stock_captions(export, face)
    assert stock["expblip_imported"] is False and stock["auto_processor"] == "Blip2Processor"
    assert stock["generation"]["num_beams"] == 5
    caption = describe_py_caption(export, face, capsys)
    assert caption and stock["processor"] == stock["pipeline"] == stock["chat"] == caption


def test_merged_export_works_in_stock_transformers(tmp_path, face, capsys):
    """A trainable-only export merged onto its towers (launch/export.py --merge) is as complete as a full one."""
    from transformers import Blip2Config

    from expblip.model.tokenizer import load_tokenizer
    from expblip.model.weights import read_state, save_trainable_export

    towers = make_tiny_export(tmp_path / "towers", seed=3)
    config = Blip2Config.from_pretrained(str(towers))
    state = read_state(towers)
    trained = {k: (v + 0.01 if k.startswith("qformer.") else v) for k, v in state.items()}  # as if stage 2 trained
    trainable = [k for k in state if k.startswith(("qformer.", "query_tokens", "language_projection."))]
    save_trainable_export(trained, config, load_tokenizer(towers), tmp_path / "small", trainable)
    assert launch_module("export").main(["--merge", str(tmp_path / "small"), "--towers", str(towers),
                                         "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    merged = read_state(tmp_path / "merged")
    assert all(torch.equal(merged[k], trained[k]) for k in merged)
    assert (tmp_path / "merged" / "processor_config.json").is_file()
    stock = stock_captions(tmp_path / "merged", face)
    assert stock["processor"] == stock["pipeline"] == describe_py_caption(tmp_path / "merged", face, capsys)
