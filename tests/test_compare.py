"""launch/compare.py: runs recorded by the training tracker, compared side by side from SQLite and from a server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_module
from PIL import Image

from expblip.eval.compare import MISSING, RunSummary, comparison_table, differing_params

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_C0, MATPLOTLIB_C1 = (31, 119, 180), (255, 127, 14)  # the first two lines of a plot
SLOW_LOSSES = [4.0, 3.6, 3.3, 3.1, 2.95]  # lr 1e-4
FAST_LOSSES = [4.0, 3.0, 2.2, 1.7, 1.25]  # lr 1e-3


def _compare_main(argv: list[str]) -> int:
    return launch_module("compare").main(argv)


def _training_run(uri: str, run_dir: Path, experiment: str, lr: str, losses: list[float],
                  eval_f1: float | None = None) -> str:
    """A run as the training loop records it: the flattened config as params, loss/lr per step, eval.* at the end."""
    from expblip.config import load_config, to_dict
    from expblip.train.tracking import MlflowTracker

    cfg = load_config(None, [f"optim.lr={lr}", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                             f"train.run_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    tracker = MlflowTracker(cfg.tracking, run_dir)
    tracker.log_params(to_dict(cfg))
    for step, loss in enumerate(losses, start=1):
        tracker.log_metrics({"loss": loss, "lr": float(lr)}, step=step * 10)
    if eval_f1 is not None:
        tracker.log_metrics({"eval.mean_au_f1": eval_f1}, step=len(losses) * 10)
    tracker.close()
    return tracker.run_id


def _two_runs(uri: str, root: Path, experiment: str) -> dict[str, str]:
    return {"slow": _training_run(uri, root / "lr-slow", experiment, "1e-4", SLOW_LOSSES, eval_f1=0.41),
            "fast": _training_run(uri, root / "lr-fast", experiment, "1e-3", FAST_LOSSES)}


def _line(out: str, label: str) -> list[str]:
    """Cells of the table row whose label is `label` (cells are separated by 2+ spaces)."""
    rows = [line for line in out.splitlines() if line.split("  ")[0] == label]
    assert len(rows) == 1, f"no single row {label!r} in:\n{out}"
    return re.split(r"\s{2,}", rows[0].strip())[1:]


def _pixels_of(png: Path, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30).sum())


def _assert_comparison(out: str, runs: dict[str, str], png: Path) -> None:
    assert _line(out, "run") == ["lr-slow", "lr-fast"]
    assert _line(out, "run id") == [runs["slow"], runs["fast"]]
    assert _line(out, "status") == ["FINISHED", "FINISHED"]
    assert _line(out, "optim.lr") == ["0.0001", "0.001"]
    # Equal params are hidden; run_dir differs (it names each run) and is shown.
    for equal in ("optim.min_lr", "train.max_steps", "model.preset", "tracking.experiment"):
        assert equal not in out, f"equal param {equal} shown"
    assert "train.run_dir" in out
    assert _line(out, "loss") == ["2.95", "1.25"] and _line(out, "loss last step") == ["50", "50"]
    assert _line(out, "lr") == ["0.0001", "0.001"]
    assert _line(out, "eval.mean_au_f1") == ["0.41", MISSING]
    assert out.index("\nloss ") < out.index("\neval.mean_au_f1")  # training metrics before eval.*
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert Image.open(png).size == (800, 450)
    # Both curves are drawn: each run's colour covers a line's worth of pixels.
    assert _pixels_of(png, MATPLOTLIB_C0) > 300 and _pixels_of(png, MATPLOTLIB_C1) > 300


def test_compare_sqlite_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory but the PNG asked for
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = _two_runs(uri, tmp_path / "runs", "cmp-sqlite")
    assert _compare_main(["--experiment", "cmp-sqlite", "--tracking-uri", uri, "--out", "curves.png"]) == 0
    out = capsys.readouterr().out
    _assert_comparison(out, runs, tmp_path / "curves.png")
    assert "curves of 2 run(s)" in out

    # --filter on a dotted param selects one run; a .db path works as the store too.
    assert _compare_main(["--experiment", "cmp-sqlite", "--tracking-uri", str(tmp_path / "mlflow.db"),
                          "--filter", "params.optim.lr = '0.0001'", "--out", "one.png"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "run") == ["lr-slow"] and runs["fast"] not in out
    assert _pixels_of(tmp_path / "one.png", MATPLOTLIB_C0) > 300 and _pixels_of(tmp_path / "one.png", MATPLOTLIB_C1) == 0


def test_compare_tracking_server(mlflow_server, tmp_path, capsys):
    runs = _two_runs(mlflow_server, tmp_path / "runs", "cmp-server")
    png = tmp_path / "plots" / "server.png"
    assert _compare_main(["--experiment", "cmp-server", "--tracking-uri", mlflow_server, "--out", str(png)]) == 0
    _assert_comparison(capsys.readouterr().out, runs, png)

    # Another metric, from $MLFLOW_TRACKING_URI.
    code = subprocess.run([sys.executable, "launch/compare.py", "--experiment", "cmp-server", "--metric", "lr",
                           "--out", str(tmp_path / "lr.png")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, timeout=120)
    assert code.returncode == 0, code.stderr
    assert "lr curves of 2 run(s)" in code.stdout and (tmp_path / "lr.png").is_file()


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, capsys):
    start = time.monotonic()
    assert _compare_main(["--experiment", "x", "--tracking-uri", "http://127.0.0.1:9/"]) == 2
    assert time.monotonic() - start < 5 and "http://127.0.0.1:9/ is unreachable" in capsys.readouterr().err

    start = time.monotonic()
    result = subprocess.run([sys.executable, "launch/compare.py", "--experiment", "x", "--tracking-uri",
                             "http://127.0.0.1:9", "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and "http://127.0.0.1:9" in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()
    assert elapsed < 30, f"took {elapsed:.1f} s"  # python start-up only; MLflow's own retries take minutes


def test_missing_store_and_unknown_experiment_are_named(tmp_path, capsys):
    db = tmp_path / "nowhere" / "mlflow.db"
    assert _compare_main(["--experiment", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert str(db) in capsys.readouterr().err and not db.exists()  # no empty store created on the way

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _training_run(uri, tmp_path / "r", "present", "1e-4", SLOW_LOSSES)
    assert _compare_main(["--experiment", "absent", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "'absent' not found" in err and "present" in err
    assert _compare_main(["--experiment", "present", "--tracking-uri", uri, "--filter", "params.optim.lr = 1"]) == 2
    assert "bad --filter" in capsys.readouterr().err
    assert _compare_main(["--experiment", "present", "--tracking-uri", uri, "--metric", "nope",
                          "--out", str(tmp_path / "n.png")]) == 2
    assert "no run logged metric 'nope'" in capsys.readouterr().err


def test_table_hides_equal_params_and_marks_missing_ones():
    a = RunSummary("a" * 32, "a", "FINISHED", {"optim.lr": "0.1", "seed": "0", "only_a": "x"}, {"loss": 1.5})
    b = RunSummary("b" * 32, "b", "FAILED", {"optim.lr": "0.2", "seed": "0"}, {"loss": 2.0, "eval.f1": 0.5})
    assert differing_params([a, b]) == ["only_a", "optim.lr"]
    table = comparison_table([a, b])
    assert "seed" not in table and "2 of 3" in table
    assert _line(table, "only_a") == ["x", MISSING] and _line(table, "eval.f1") == [MISSING, "0.5"]
    assert _line(table, "loss last step") == [MISSING, MISSING]


def test_compare_loads_no_training_stack():
    # The library and the thin script import neither the training stack nor (until a store is read) mlflow.
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('launch_compare', 'launch/compare.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "bad = [m for m in ('ray', 'deepspeed', 'torch', 'mlflow', 'expblip.train') if m in sys.modules]\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with pytest.raises(SystemExit):
        _compare_main(["--help"])
