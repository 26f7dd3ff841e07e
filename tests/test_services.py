"""The real services of tests/services.py answer like the real thing: S3 (boto3, s3fs) and MLflow over HTTP.
The Ray head is exercised by tests/test_cluster_specs.py::test_runtime_env_job_trains_on_a_ray_head."""

from __future__ import annotations

import pytest
from services import port_open, seaweedfs


def test_s3_put_get_with_boto3(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="boto")
    client.put_object(Bucket="boto", Key="dir/a.txt", Body=b"hello s3")
    assert client.get_object(Bucket="boto", Key="dir/a.txt")["Body"].read() == b"hello s3"
    assert [o["Key"] for o in client.list_objects_v2(Bucket="boto")["Contents"]] == ["dir/a.txt"]
    assert s3_server.endpoint.startswith("http://127.0.0.1:")


def test_s3_refuses_unknown_credentials(s3_server):
    import boto3
    from botocore.exceptions import ClientError

    intruder = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="nobody",
                            aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        intruder.list_buckets()


def test_s3fs_lists_with_only_aws_environment(s3_server, monkeypatch):
    # The way training code sees S3: no endpoint or key in code, only AWS_* in the environment.
    import fsspec

    s3_server.client().create_bucket(Bucket="fsspec")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with fs.open("fsspec/shards/train-000000.tar", "wb") as f:
        f.write(b"x" * 1000)
    fs.pipe("fsspec/shards/manifest.json", b"{}")
    assert sorted(fs.ls("fsspec/shards", detail=False)) == ["fsspec/shards/manifest.json",
                                                            "fsspec/shards/train-000000.tar"]
    assert fs.size("fsspec/shards/train-000000.tar") == 1000
    with fsspec.open("s3://fsspec/shards/manifest.json", "rb") as f:
        assert f.read() == b"{}"


def test_seaweedfs_stop_frees_its_port(tmp_path):
    server = seaweedfs(tmp_path / "s3")
    assert port_open(server.endpoint)
    server.stop()
    server.stop()  # idempotent
    assert not port_open(server.endpoint)


def test_mlflow_server_records_a_run_over_http(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("services-test")
    run = client.create_run(experiment_id, run_name="over-http")
    client.log_param(run.info.run_id, "optim.lr", "0.0001")
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    (tmp_path / "note.txt").write_text("artefact through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)

    fetched = MlflowClient(mlflow_server).get_run(run.info.run_id)
    assert fetched.info.status == "FINISHED" and fetched.data.params == {"optim.lr": "0.0001"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.5, 2.0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
