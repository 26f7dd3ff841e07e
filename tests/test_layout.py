"""The import drawing of DESIGN.md, read statically from every module: no arrow runs back up.

    launch ──▶ pipeline ──▶ train ──▶ model          eval ──▶ infer ──▶ model
                                  └─▶ data ──▶ pixels      serve ──┘          data
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "expblip"

# room -> module prefixes it must never import (at module level or inside a function)
WALLS = {
    "model": ("ray", "deepspeed", "mlflow", "expblip.data", "expblip.train", "expblip.eval", "expblip.serve",
              "expblip.infer", "expblip.pipeline"),
    "data": ("expblip.model", "expblip.train", "expblip.eval", "expblip.serve", "expblip.infer", "expblip.pipeline",
             "deepspeed"),
    "infer": ("ray", "deepspeed", "mlflow", "expblip.eval", "expblip.serve", "expblip.train", "expblip.pipeline"),
    "eval": ("ray", "deepspeed", "expblip.serve", "expblip.train", "expblip.pipeline"),
    "serve": ("deepspeed", "expblip.eval", "expblip.train", "expblip.pipeline"),
}
OWN_RAY_MODULES = {"serve/ray_serve.py"}  # wall 2: Ray only in a module of its own


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module name, line) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


@pytest.mark.parametrize("room", sorted(WALLS))
def test_no_room_imports_what_its_wall_forbids(room):
    bad = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        forbidden = WALLS[room]
        if relative in OWN_RAY_MODULES:
            forbidden = tuple(f for f in forbidden if f != "ray")
        bad += [f"{relative}:{line} imports {name}" for name, line in _imports(path)
                if name == forbidden or name.startswith(tuple(f"{f}." for f in forbidden)) or name in forbidden]
    assert not bad, bad


def test_mlflow_is_imported_lazily_in_eval():
    """Evaluation without tracking never loads MLflow: only function-level imports of it."""
    for path in sorted((PACKAGE / "eval").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("mlflow")], path.name


def test_clip_normalisation_is_defined_once():
    owners = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "CLIP_MEAN = " in p.read_text()
              or "CLIP_MEAN: " in p.read_text()]
    assert owners == ["pixels.py"]
