"""Venvs of their own for outside engines the project's venv cannot hold (tests/vllm_env.py: vLLM's CPU build;
tests/pipeline_env.py: transformers' image-text-to-text pipeline with torchvision), made once in ~/.cache/expblip and
reused while their package spec is the same. A test skips, with the reason and the build log's tail, where one cannot
be made."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

READY = ".expblip-ready"  # written last: a venv without it is half-built and is made again


@dataclass(frozen=True)
class SideVenv:
    """What a side venv holds: `install` in one pip call, then `remove` uninstalled, then `check` run in it."""

    directory: Path
    install: tuple[str, ...]
    remove: tuple[str, ...] = ()
    check: str = ""  # python code that must run in the new venv (imports, versions)
    what: str = "the venv"

    def spec(self) -> str:
        return " ".join(self.install) + "".join(f" -{r}" for r in self.remove)

    def ensure(self) -> tuple[Path | None, str]:
        """(the venv's python, "") once it is ready, else (None, why not)."""
        venv, python = self.directory, self.directory / "bin" / "python"
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(venv.parent / (venv.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes do not build it at once
            ready = venv / READY
            if ready.exists() and ready.read_text().strip() == self.spec() and python.exists():
                return python, ""
            log = venv.parent / (venv.name + ".log")
            log.write_text("")
            t0 = time.monotonic()
            try:
                self._build(log)
            except (subprocess.CalledProcessError, OSError) as e:
                tail = "\n".join(log.read_text().splitlines()[-6:])
                return None, f"cannot make {self.what} at {venv} ({e}); see {log}:\n{tail}"
            with log.open("a") as out:
                out.write(f"built in {time.monotonic() - t0:.0f} s\n")
            return python, ""

    def _build(self, log: Path) -> None:
        venv = self.directory
        shutil.rmtree(venv, ignore_errors=True)
        # the base interpreter, not the project's venv: the new venv must not see the project's packages
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(venv)], log)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        _run([*pip, "install", "--no-compile", *self.install], log)
        if self.remove:
            _run([*pip, "uninstall", "-y", *self.remove], log)
        if self.check:
            _run([str(venv / "bin" / "python"), "-c", self.check], log)
        (venv / READY).write_text(self.spec() + "\n")


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
