"""What the quality benches (lora_parity.py, three_task.py) share: a chain of training stages, each a world of one in
this process and each from the export of the one before, and trainings run side by side, one per core."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_stages(stages: Sequence[tuple[Path, str, int, Sequence[str]]], train_shards: str, seed: int, times: dict,
                 label: str, scale: float = 1.0) -> None:
    """stages: (run dir, recipe in recipes/, steps, extra overrides), trained in order on ``train_shards``, each from
    the export of the one before (the first from random weights), ``steps * scale`` steps (at least 1), seeded
    initialisation and data order. A stage whose export exists is kept (another setting or an earlier run trained
    it). times[f"{label}.{run dir's name}"]: the seconds of each stage trained."""
    from expblip.config import load_config
    from expblip.pipeline.chain import launch

    weights = ""
    for run_dir, recipe, steps, extra in stages:
        if not (run_dir / "export" / "config.json").is_file():
            steps = max(1, int(steps * scale))
            overrides = [f"data.train.shards={train_shards}", f"train.run_dir={run_dir}", f"train.max_steps={steps}",
                         f"train.ckpt_every={steps}", "tracking.enabled=false", f"train.seed={seed}",
                         f"data.train.seed={seed}", f"model.weights={weights}", *extra]
            start = time.perf_counter()
            launch(load_config(REPO / "recipes" / f"{recipe}.yaml", overrides), "local")
            times[f"{label}.{run_dir.name}"] = time.perf_counter() - start
        weights = str(run_dir)


def side_by_side(calls: Sequence[Callable[[], None]], at_once: int = 2) -> None:
    """Run the calls in threads, ``at_once`` at a time (one per core), group after group in order. A failure is
    raised once its group has ended (else a thread's error would only be printed, and the bench would go on to
    score an export that was never written)."""
    for start in range(0, len(calls), at_once):
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_guarded, args=(c, errors)) for c in calls[start:start + at_once]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _guarded(call: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - raised by side_by_side once the group has ended
        errors.append(error)
