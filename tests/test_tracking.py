"""The MLflow tracker: one store per run even within one process, re-attach by the run directory's id file."""

from __future__ import annotations

import os

from expblip.config import load_config


def _tracker(tmp_path, name: str, **extra):
    from expblip.train.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    (tmp_path / name).mkdir(exist_ok=True)
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=t", "tracking.system_metrics_every_s=0",
                             *[f"tracking.{k}={v}" for k, v in extra.items()]])
    return MlflowTracker(cfg.tracking, tmp_path / name), uri


def test_two_runs_in_one_process_keep_their_own_stores_and_leave_the_environment_alone(tmp_path):
    from mlflow import MlflowClient

    a, uri_a = _tracker(tmp_path, "a")
    b, uri_b = _tracker(tmp_path, "b")
    a.log_metrics({"loss": 1.0}, step=1)
    b.log_metrics({"loss": 2.0}, step=1)
    a.close()
    b.close()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    for uri, run_id, loss in ((uri_a, a.run_id, 1.0), (uri_b, b.run_id, 2.0)):
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        assert runs[0].data.metrics["loss"] == loss and runs[0].info.status == "FINISHED"


def test_a_restarted_rank0_reattaches_to_the_same_run_with_a_continuous_step_axis(tmp_path):
    from mlflow import MlflowClient

    first, uri = _tracker(tmp_path, "r")
    first.log_metrics({"loss": 3.0}, step=1)
    first.close("FAILED")  # the attempt died
    second, _ = _tracker(tmp_path, "r")  # a new attempt in the same run directory
    assert second.run_id == first.run_id
    assert MlflowClient(uri).get_run(second.run_id).info.status == "RUNNING"
    second.log_metrics({"loss": 2.0}, step=2)
    second.close()
    history = MlflowClient(uri).get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]


def test_system_metrics_are_sampled_into_the_run(tmp_path):
    import time

    import psutil
    from mlflow import MlflowClient

    tracker, uri = _tracker(tmp_path, "s", system_metrics_every_s=0.2)
    time.sleep(1.5)
    used = psutil.virtual_memory().used / 2**20
    tracker.close()
    client = MlflowClient(uri)
    memory = client.get_metric_history(tracker.run_id, "system/system_memory_usage_megabytes")
    assert len(memory) >= 3  # sampled every 0.2 s over 1.5 s (MLflow logs samples in batches)
    assert [m.step for m in memory] == sorted(m.step for m in memory)
    assert abs(memory[-1].value - used) < 0.25 * used  # the machine's memory in use, as psutil reads it
    assert client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")


def test_recipe_tag_defaults_to_the_config_file_stem():
    assert load_config("recipes/tiny_stage2.yaml").tracking.recipe == "tiny_stage2"
    assert load_config("recipes/tiny_stage2.yaml", ["tracking.recipe=mine"]).tracking.recipe == "mine"
    assert load_config(None).tracking.recipe == ""


def test_uris_are_shown_with_their_credentials_redacted(tmp_path):
    from expblip.train.tracking import redact_uri

    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/x") == "https://***@mlflow.example.com:5000/x"
    assert redact_uri("https://token@mlflow.example.com") == "https://***@mlflow.example.com"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
