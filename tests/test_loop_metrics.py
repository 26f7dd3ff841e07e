"""The loop's logged numbers: the loss of a log line is the mean over its window, not the last step's."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from expblip.config import load_config
from expblip.train.loop import Window, _global_metrics


@pytest.fixture()
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Engine:
    def get_lr(self) -> list[float]:
        return [1e-4]

    def get_global_grad_norm(self) -> float:
        return 0.5


def _run(**cfg) -> SimpleNamespace:
    overrides = [f"{k}={v}" for k, v in cfg.items()]
    return SimpleNamespace(cfg=load_config(None, overrides), world=1, engine=_Engine(), tokens=640, window=Window(),
                           errors={0: {"bad_image": 2}, 1: {"bad_json": 1}})


def test_the_logged_loss_is_the_mean_of_the_window_and_the_window_restarts(world_of_one):
    run = _run(**{"data.train.batch_size": 4})
    for loss, itc in ((4.0, 1.0), (3.0, 0.5), (2.0, 0.0), (1.0, 0.5)):
        run.window.add(torch.tensor(loss), {"loss_itc": torch.tensor(itc)})  # device tensors, read at log time
    metrics = _global_metrics(run)
    assert metrics["loss"] == pytest.approx(2.5)  # not 1.0, the last step's
    assert metrics["loss_itc"] == pytest.approx(0.5)
    assert metrics["data.skipped.total"] == 3 and metrics["data.skipped.bad_image"] == 2
    assert metrics["seconds_per_step"] == pytest.approx(metrics["samples_per_s"] ** -1 * 4)  # 4 samples a step
    assert run.window.losses == [] and run.tokens == 0  # the next line averages only what comes after
    run.window.add(torch.tensor(7.0), {})
    assert _global_metrics(run)["loss"] == pytest.approx(7.0)


def test_a_stage_prints_about_ten_progress_lines_off_a_terminal_however_often_it_logs():
    import io

    from expblip.train.console import Progress

    out = io.StringIO()
    progress = Progress("tiny_stage2", out)
    for step in range(1, 1001):  # a 1000-step stage that logs every step
        progress.update({"step": step, "total": 1000, "loss": 1.0 / step, "samples_per_s": 170.0, "eta": "1m00s"})
    progress.write("[expblip] a warning")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 + 1  # steps 100, 200, ..., 1000 and the first, then the warning
    assert lines[0] == "[expblip] tiny_stage2: step 1/1000 loss 1.0000 170.0 samples/s ETA 1m00s"
    assert lines[-2].startswith("[expblip] tiny_stage2: step 1000/1000 loss 0.0010") and lines[-1].endswith("warning")
