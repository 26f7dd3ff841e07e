"""A venv of its own for transformers' image-text-to-text pipeline on a Qwen2.5-VL export (tests/test_hf_pipeline.py),
made once in ~/.cache/expblip and reused (tests/side_venv.py).

transformers 5.24 builds Qwen2_5_VLProcessor (AutoProcessor, the pipeline) only with torchvision, and no torchvision
build imports beside the project's CPU torch 2.13 (`operator torchvision::nms does not exist`). This venv holds
torch 2.14.1 and torchvision 0.29.1 as they lie on the machine's disk (CUDA builds: 5.4 GB, run on the CPU) and the
project's transformers, and nothing of expblip: the reading side is stock transformers only.

    python tests/pipeline_env.py      # create (or reuse) the venv and print its python; about 1.5 min the first time
    python tests/pipeline_env.py --caption EXPORT IMAGE...   # (in that venv) one JSON line per image
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TRANSFORMERS = "transformers==5.24.0"  # the project's pin (pyproject.toml)
DEFAULT_DIR = Path.home() / ".cache" / "expblip" / "hf-pipeline-venv"


def ensure_pipeline_venv() -> tuple[Path | None, str]:
    """(the venv's python, "") once it is ready, else (None, why not): the caller skips with that reason."""
    from side_venv import SideVenv

    return SideVenv(Path(os.environ.get("EXPBLIP_PIPELINE_VENV", DEFAULT_DIR)),
                    ("torch==2.14.1", "torchvision==0.29.1", TRANSFORMERS, "pillow", "safetensors"), (),
                    "import torchvision, transformers; from transformers import Qwen2_5_VLProcessor",
                    "the image-text-to-text pipeline's venv").ensure()


def caption(export: str, images: list[str], max_new_tokens: int) -> None:
    """Greedy captions of the images from transformers' image-text-to-text pipeline (the export's own processor,
    chat template and weights), one JSON line each: {"image", "caption", "processor"}."""
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=export, device="cpu")
    greedy = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}  # else generation_config.json's
    for path in images:
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(path).convert("RGB")},
                                                 {"type": "text", "text": ""}]}]
        out = pipe(text=messages, generate_kwargs=greedy, return_full_text=False)
        print(json.dumps({"image": path, "caption": out[0]["generated_text"].strip(),
                          "processor": type(pipe.processor).__name__}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--caption"]:
        caption(sys.argv[2], sys.argv[3:], int(os.environ.get("MAX_NEW_TOKENS", "12")))
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).parent))
    t0 = time.monotonic()
    py, why = ensure_pipeline_venv()
    print(py or why, f"({time.monotonic() - t0:.0f} s)")
    sys.exit(0 if py else 1)
