"""The documentation: docs/ builds with `mkdocs build --strict` (every page in the navigation, every link and anchor
between pages resolved), the README stays a front page whose links resolve, and the quick start's "By hand" commands
run as written, in a scratch directory, the way a new user would paste them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = [sys.executable, "-m", "mkdocs"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*MKDOCS, "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120)


def anchors(page: Path) -> set[str]:
    """The ids MkDocs gives a page's headings (Python-Markdown's toc slugify), outside fenced blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_docs_build_strict_with_every_link_and_anchor_resolved(tmp_path):
    proc = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").glob("*.md"))
    built = [p for p in pages if (tmp_path / "site" / ("" if p == "index" else p) / "index.html").is_file()]
    assert built == pages


def test_a_broken_anchor_or_page_fails_the_build(tmp_path):
    """The strict build is what catches them: a copy of the docs with one bad anchor and one missing page fails."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as f:
        f.write("\n[a](training.md#no-such-section) and [b](no-such-page.md)\n")
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-section" in proc.stderr and "no-such-page.md" in proc.stderr


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert re.findall(r"^make (\w+)", readme, flags=re.M) == ["demo", "test"]  # the two set-up commands
    targets = [t for t in LINK.findall(readme) if not t.startswith(("http://", "https://"))]
    assert len(targets) >= 14  # the map names every page
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
        assert not anchor or anchor in anchors(ROOT / path), f"README links to {target}: no such heading"
    linked = {Path(t.partition("#")[0]).name for t in targets}
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}


def quickstart_blocks() -> tuple[str, str]:
    """The bash and python blocks of the quick start's "By hand" section."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    section = text.split("## By hand", 1)[1].split("\n## ", 1)[0]
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return bash, python


@pytest.mark.slow
def test_quickstart_by_hand_runs_as_written(tmp_path):
    """Every command of the section, pasted into bash in a directory that looks like the repository's root (its
    launch/, recipes/, ds_configs/ and .venv), and the stock-transformers snippet after it."""
    for name in ("launch", "recipes", "ds_configs", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    bash, python = quickstart_blocks()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"^held-out mean AU F1: \d\.\d{3} \(best constant caption: \d\.\d{3}\)$", proc.stdout, re.M), out
    described = re.findall(r"^demo/faces/(synthetic-test-0-000000[01]\.png): (.+?)  \[AUs", proc.stdout, re.M)
    assert [name for name, _ in described] == ["synthetic-test-0-0000000.png", "synthetic-test-0-0000001.png"]
    assert (tmp_path / "exports" / "stage2" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "stage2" / "eval" / "report.md").is_file()
    held_out = [line for line in out.splitlines() if "held-out at step" in line]
    assert len(held_out) == 2, out[-4000:]  # the validation faces scored at steps 20 and 40

    snippet = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", python], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert snippet.returncode == 0, snippet.stderr[-3000:]
    assert snippet.stdout.strip().splitlines()[-1] == described[0][1].strip()  # stock transformers = describe.py
