"""transformers' image-text-to-text pipeline gives launch/describe.py's captions for a Qwen2.5-VL export (issue 24).

The pipeline needs torchvision, which no build here imports beside the project's CPU torch: it runs in a venv of its
own (tests/pipeline_env.py: stock torch 2.14.1, torchvision 0.29.1 and the project's transformers, nothing of
expblip), made once in ~/.cache/expblip and reused; the test skips, with the reason, where it cannot be made. The
export is a tiny Qwen2.5-VL at dynamic resolution, trained here until each of four faces of four shapes gets its own
caption, so the captions compare the image path too, not only the language model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_launcher
from PIL import Image

pytestmark = [pytest.mark.engines, pytest.mark.slow]
CAPTIONS = ["a smiling face with raised cheeks", "a frowning face with lowered brows",
            "a surprised face with open mouth", "a sad face with lip corners down"]
# (H, W): sizes BOUNDS keep, so no processor resizes them; 16 x 48 only if the export carries BOUNDS (the tiny
# processor's own minimum, 1,024 px, would enlarge it)
SIZES = [(64, 64), (48, 80), (80, 48), (16, 48)]
BOUNDS = (256, 4096)


@pytest.fixture(scope="module")
def pipeline_python() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from pipeline_env import ensure_pipeline_venv

    python, why = ensure_pipeline_venv()
    if python is None:
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, list[Path]]:
    """(an export of a tiny Qwen2.5-VL trained on four faces of four shapes at dynamic resolution, their PNGs)."""
    from expblip.model import qwen_vl
    from expblip.pixels import normalise_batch

    root = tmp_path_factory.mktemp("hf_pipeline")
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in SIZES]
    tokenizer = qwen_vl.tiny_tokenizer(CAPTIONS, vocab_size=300)
    processor = qwen_vl.make_processor(tokenizer)  # other bounds: the export writes the model's
    torch.manual_seed(0)
    model = qwen_vl.build_model(tokenizer)
    model.config.expblip_min_pixels, model.config.expblip_max_pixels = BOUNDS
    batch = {**qwen_vl.spec_text_inputs(processor, model.config, CAPTIONS, None, 16, image_sizes=SIZES),
             **qwen_vl.spec_pixel_inputs(model.config, normalise_batch(images))}
    unit, opt = qwen_vl.CaptionUnit(model), torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        unit(**batch).backward()
        opt.step()
    out = qwen_vl.spec_save_export(model.state_dict(), model.config, processor, root / "export")
    paths = []
    for i, image in enumerate(images):
        paths.append(root / f"face{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return out, paths


def test_the_image_text_to_text_pipeline_gives_describe_py_s_captions(pipeline_python, export):
    out, faces = export
    proc = run_launcher([sys.executable, "launch/describe.py", "--model", str(out), "--beams", "1",
                         "--max-new-tokens", "20", "--json", *map(str, faces)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [json.loads(line)["caption"] for line in proc.stdout.splitlines() if line.startswith("{")]
    theirs = subprocess.run([str(pipeline_python), str(REPO / "tests" / "pipeline_env.py"), "--caption", str(out),
                             *map(str, faces)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MAX_NEW_TOKENS": "20", "PYTHONPATH": ""})
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    answers = [json.loads(line) for line in theirs.stdout.splitlines() if line.startswith("{")]
    assert {a["processor"] for a in answers} == {"Qwen2_5_VLProcessor"}  # AutoProcessor, as the pipeline builds it
    # each face its own whole caption, ended by the end token before the 20-token limit: the image path agrees too
    assert [a["caption"] for a in answers] == ours == CAPTIONS
