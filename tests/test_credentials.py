"""Credentials reach Ray workers from their own environment or a 0600 file, never through Ray, and are redacted in
everything a run writes (the end-to-end search is tests/test_cluster.py)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from expblip.config import dump_config, load_config, public_dict
from expblip.credentials import load_credentials, redact_uri, secret_env, unredact_uri

SECRET = "very-secret-value-1234"
ENV = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SECRET + "-token",
       "AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_DEFAULT_REGION": "us-east-1", "DS_ACCELERATOR": "cpu",
       "MLFLOW_TRACKING_URI": f"http://alice:{SECRET}@mlflow.example:5000"}


def test_ray_forwards_no_secret_through_its_runtime_env():
    from expblip.train.ray_job import forwarded_env

    forwarded = forwarded_env(ENV)
    assert forwarded == {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_DEFAULT_REGION": "us-east-1",
                         "DS_ACCELERATOR": "cpu"}  # the tracking URI carries a password: it stays behind
    assert forwarded_env({"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}) == {
        "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    assert set(secret_env(ENV)) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                    "MLFLOW_TRACKING_URI"}


def test_a_local_cluster_gets_a_0600_file_that_is_gone_afterwards(monkeypatch):
    from expblip.train.ray_job import worker_credentials

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, [f"tracking.uri=https://bob:{SECRET}@tracking.example"])
    with worker_credentials(cfg, "file") as (worker_cfg, path):
        file = Path(path)
        assert stat.S_IMODE(file.stat().st_mode) == 0o600 and stat.S_IMODE(file.parent.stat().st_mode) == 0o700
        values = json.loads(file.read_text())
        assert values["AWS_SECRET_ACCESS_KEY"] == SECRET and values["AWS_SESSION_TOKEN"] == SECRET + "-token"
        assert values["MLFLOW_TRACKING_URI"] == f"https://bob:{SECRET}@tracking.example"  # the config's, moved here
        assert worker_cfg.tracking.uri == "" and SECRET not in json.dumps(public_dict(worker_cfg))
        received: dict = {}
        assert load_credentials(path, received) == sorted(values) and received == values  # what a worker does
    assert not file.exists() and not file.parent.exists()
    with pytest.raises(RuntimeError, match="only exists on the driver's machine.*ray.credentials=environment"):
        load_credentials(path, {})


def test_a_real_cluster_passes_nothing_and_the_password_stays_behind():
    from expblip.train.ray_job import worker_credentials

    cfg = load_config(None, [f"tracking.uri=https://bob:{SECRET}@tracking.example/x"])
    with worker_credentials(cfg, "environment") as (worker_cfg, path):
        assert path == "" and worker_cfg.tracking.uri == "https://tracking.example/x"


def test_ray_storage_filesystem_pickles_a_path_and_loads_the_keys_where_it_is_unpickled(tmp_path):
    from expblip.credentials import write_credentials
    from expblip.train.ray_job import storage_filesystem

    path = write_credentials({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET})
    saved = dict(os.environ)  # building the filesystem loads the file here too
    try:
        blob = pickle.dumps(storage_filesystem("s3://bucket/ray", str(path)))
        assert SECRET.encode() not in blob and str(path).encode() in blob
        code = ("import os, pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
                "print(os.environ.get('AWS_SECRET_ACCESS_KEY'))")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, check=True)
        assert out.stdout.decode().strip() == SECRET  # Ray's controller and workers get the keys from the file
    finally:
        os.environ.clear()
        os.environ.update(saved)
        path.unlink()
        path.parent.rmdir()
    assert storage_filesystem("/local/ray") is None


def test_config_dumps_and_params_hold_uris_without_passwords(tmp_path):
    cfg = load_config(None, [f"tracking.uri=https://alice:{SECRET}@mlflow.example:5000/x",
                             "data.train.shards=s3://bucket/shards"])
    assert public_dict(cfg)["tracking"]["uri"] == "https://***@mlflow.example:5000/x"
    assert public_dict(cfg)["data"]["train"]["shards"] == "s3://bucket/shards"
    dump_config(cfg, tmp_path / "config.yaml")
    assert SECRET not in (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["tracking"]["uri"].startswith("https://***@")


def test_a_redacted_uri_in_a_run_file_is_usable_again_from_the_environment():
    stored = redact_uri(ENV["MLFLOW_TRACKING_URI"])
    assert SECRET not in stored
    assert unredact_uri(stored, ENV) == ENV["MLFLOW_TRACKING_URI"]
    assert unredact_uri(stored, {}) == "http://mlflow.example:5000"  # then MLFLOW_TRACKING_USERNAME / PASSWORD
    assert unredact_uri("sqlite:////x/mlflow.db", ENV) == "sqlite:////x/mlflow.db"


def test_an_unreachable_server_is_named_without_its_password():
    from expblip.config import ConfigError
    from expblip.train.tracking import check_reachable

    with pytest.raises(ConfigError) as err:
        check_reachable(f"http://alice:{SECRET}@127.0.0.1:9", timeout=2)
    assert SECRET not in str(err.value) and "http://***@127.0.0.1:9" in str(err.value)


def test_registry_finds_the_training_run_of_a_password_uri(tmp_path, monkeypatch):
    """mlflow_run.json stores the URI redacted; with the same URI and its password in $MLFLOW_TRACKING_URI the
    registry must still see the run as the server's, so the registered version is linked to its training run."""
    from expblip.train.registry import training_run
    from expblip.train.tracking import RUN_FILE, write_run_file

    uri = "http://alice:s3cret@127.0.0.1:5000"
    write_run_file(tmp_path / RUN_FILE, "abc123", uri)
    assert "s3cret" not in (tmp_path / RUN_FILE).read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert training_run(tmp_path / "export") == {"run_id": "abc123", "tracking_uri": uri}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # no password at hand: the URI without user info (MLflow's env auth)
    assert training_run(tmp_path / "export")["tracking_uri"] == "http://127.0.0.1:5000"
