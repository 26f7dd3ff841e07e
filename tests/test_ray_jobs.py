"""Ray jobs that survive failures, resume when re-submitted, run through `ray job submit`, and fail fast."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, read_metrics, run_launcher

pytestmark = pytest.mark.slow


def args(shards, run_dir, *extra) -> list[str]:
    return [f"data.train.shards={shards}", "data.train.batch_size=8", "model.dropout=0.0", "optim.warmup_steps=2",
            f"train.run_dir={run_dir}", "train.log_every=1", "tracking.experiment=ray-jobs", *extra]


def _ray_train_workers(driver_pid: int) -> list[psutil.Process]:
    """Ray Train workers of this driver's own local cluster (never another test's or session's)."""
    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_sigkill_of_a_worker_resumes_from_last_checkpoint_and_a_resubmission_continues(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--verbose",  # Ray's own output too, so the kill shows in it
           *args(tiny_shards["train"], run_dir, "train.max_steps=60", "train.ckpt_every=8", "ray.max_failures=1")]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step00000008").is_dir():  # at least one checkpoint first
        assert driver.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.5)
    time.sleep(0.3)  # a step or two past the checkpoint, long before the run ends
    victims = _ray_train_workers(driver.pid)
    assert victims, "no Ray Train worker process found"
    victims[-1].send_signal(signal.SIGKILL)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    assert "(RayTrainWorker pid=" in out  # --verbose forwards the workers' output, Ray's prefixes included
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps[-1] == 60 and sorted(set(steps)) == list(range(1, 61))  # finished, no step missing
    starts = [int(n) for n in re.findall(r"start step (\d+)", out)]
    assert starts[0] == 0 and len(starts) >= 2, starts  # a second attempt began after the kill
    assert starts[-1] > 0 and starts[-1] % 8 == 0, starts  # ...from the newest checkpoint (every 8 steps)
    assert len(steps) - len(set(steps)) < 8  # nothing repeated beyond the checkpoint interval

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ray-jobs").experiment_id])
    assert len(runs) == 1  # one MLflow run across both attempts
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == set(range(1, 61))

    # the finished run, submitted again with more steps, continues from its last checkpoint (step 60)
    again = run_launcher([sys.executable, "launch/pretrain.py",
                          *args(tiny_shards["train"], run_dir, "train.max_steps=64", "train.ckpt_every=8")])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.findall(r"start step (\d+)", again.stdout) == ["60"]  # rank 0 says it, once
    # the default console: expblip's lines only, each once, a few progress lines; none of Ray's own
    lines = again.stdout.splitlines()
    assert lines and all(line.startswith("[expblip] ") for line in lines), lines
    assert len(lines) == len(set(lines)) and len(lines) < 15, lines
    assert not re.search(r"RayTrainWorker|PlacementGroup|TrainController|Preemption", again.stdout + again.stderr)
    assert [m["step"] for m in read_metrics(run_dir)][-4:] == [61, 62, 63, 64]
    runs = client.search_runs([client.get_experiment_by_name("ray-jobs").experiment_id])
    assert len(runs) == 1 and {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == set(
        range(1, 65))


# `ray job submit` against a local `ray start --head`: tests/test_cluster_specs.py::test_runtime_env_job_trains_on_a_ray_head
# submits launch/pretrain.py with the shipped cluster/runtime_env.yaml and checks the steps in the job's logs.


@pytest.mark.parametrize("override, named", [("tracking.uri=http://127.0.0.1:9", "http://127.0.0.1:9"),
                                             ("ray.storage_path=s3://no-such-bucket-expblip/x", "no-such-bucket")])
def test_unreachable_tracking_or_storage_fails_before_workers(tiny_shards, tmp_path, s3_server, override, named):
    start = time.time()
    proc = run_launcher([sys.executable, "launch/pretrain.py", *args(tiny_shards["train"], tmp_path, override)],
                        env=s3_server.env())
    assert proc.returncode == 2 and named in proc.stderr
    assert "RayTrainWorker" not in proc.stdout + proc.stderr and not (tmp_path / "checkpoints").exists()
    assert time.time() - start < 60
