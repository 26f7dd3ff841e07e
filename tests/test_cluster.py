"""Cluster reality on one machine: two Ray nodes, a lost node, two DeepSpeed hosts, storage and tracking outages, a
kill during a checkpoint write, and no credential anywhere a run leaves a trace.

Every run here trains the tiny model with the same data and seed, so a run at world size 2 must see the same
batches and losses as the one-node reference (``one_node``), and train.log_keys lets each test count samples by key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, deepspeed_cmd, read_keys, read_metrics, run_launcher
from test_train import init_export  # noqa: F401 - the module-scoped fixture of the initial weights

pytestmark = pytest.mark.slow
STEPS = 4  # steps compared with the one-node reference
EPOCH = 256  # tiny_shards: 4 shards of 64


def _args(shards: str, weights, run_dir, *extra: str) -> list[str]:
    return [f"data.train.shards={shards}", "data.train.batch_size=8", f"model.weights={weights}", "model.dropout=0.0",
            "optim.lr=3e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2", "train.log_every=1", "train.log_keys=true",
            "tracking.system_metrics_every_s=0", f"train.run_dir={run_dir}", *extra]


def _losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def _epoch_once(keys: dict[int, list[tuple[str, int]]]) -> list[str]:
    """The keys of epoch 0 as trained (latest attempt of each step); asserts none repeats."""
    epoch0 = [k for step in sorted(keys) for k, e in keys[step] if e == 0]
    assert len(epoch0) == len(set(epoch0)), "a sample of epoch 0 was trained on twice"
    return epoch0


@pytest.fixture(scope="module")
def one_node(tiny_shards, init_export, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: 2 ranks on one host (the deepspeed launcher), STEPS steps from local shards."""
    run_dir = tmp_path_factory.mktemp("one-node")
    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json",
                                      *_args(str(tiny_shards["train"]), init_export, run_dir, f"train.max_steps={STEPS}",
                                             f"train.ckpt_every={STEPS}", "tracking.enabled=false")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _upload(server, tiny_shards, bucket: str) -> str:
    client = server.client()
    client.create_bucket(Bucket=bucket)
    for f in sorted(tiny_shards["train"].iterdir()):
        client.upload_file(str(f), bucket, f"train/{f.name}")
    return f"s3://{bucket}/train"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_shards):
    """This module's own S3 server with a secret made for it (searched for verbatim), shards in s3://cluster/train."""
    from services import seaweedfs

    server = seaweedfs(tmp_path_factory.mktemp("s3"), access_key="expblip-cluster",
                       secret=f"s3-secret-{secrets.token_hex(12)}")
    _upload(server, tiny_shards, "cluster")
    server.client().create_bucket(Bucket="runs")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory):
    """A tracking server, and its URI with a user and password (the server accepts any; the password must not leak)."""
    from services import restartable_mlflow_server

    root = tmp_path_factory.mktemp("mlflow")
    server = restartable_mlflow_server(root)
    server.password = f"mlflow-pw-{secrets.token_hex(12)}"
    server.uri_with_password = server.uri.replace("http://", f"http://expblip:{server.password}@")
    server.root = root
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node on this machine's loopback, 1 CPU each: Ray Train places one worker per node. The
    nodes hold no credentials (a local cluster: the driver passes the path of a 0600 file)."""
    from services import ray_cluster

    found = ray_cluster(tmp_path_factory.mktemp("ray"), nodes=2, env={"PYTHONPATH": str(REPO)})
    yield found
    found.stop()


def _pretrain(cluster, args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_launcher([sys.executable, "launch/pretrain.py", *args, f"ray.address={cluster.address}"],
                        env={**env, **cluster.client_env()}, timeout=timeout)


# ---------------------------------------------------------------- two nodes, and no secret anywhere


def test_two_nodes_train_as_one_reading_each_sample_once_and_leave_no_credential(cluster, s3, mlflow, one_node,
                                                                                init_export, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    # the driver's own temporary directory (short: Ray's socket paths), so that another test running at the same
    # time (make test's two workers) cannot put its live credentials file where this one looks
    driver_tmp = Path(tempfile.mkdtemp(prefix="drv-"))
    # the password comes in a config file (a command line is visible to every user of a machine, and Ray records the
    # driver's as its job's entrypoint), the S3 keys in the driver's environment
    (tmp_path / "secret.yaml").write_text(f"tracking: {{uri: '{mlflow.uri_with_password}'}}\n")
    proc = _pretrain(cluster, ["--config", str(tmp_path / "secret.yaml"),
                               *_args("s3://cluster/train", init_export, run_dir, f"train.max_steps={STEPS}",
                                      "train.ckpt_every=2", "ray.num_workers=2", "ray.storage_path=s3://runs/ray",
                                      "tracking.experiment=two-nodes")], env={**s3.env(), "TMPDIR": str(driver_tmp)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one rank on each node
    placed = re.search(r"ranks on Ray nodes: rank 0 (\w+) \(([\d.]+)\), rank 1 (\w+) \(([\d.]+)\)", proc.stdout)
    assert placed and placed[1] != placed[3] and {placed[2], placed[4]} == {"127.0.0.2", "127.0.0.3"}, proc.stdout
    # the same losses and the same samples, rank by rank, as two ranks on one host
    assert _losses(run_dir) == pytest.approx(_losses(one_node), rel=1e-4)
    assert read_keys(run_dir) == read_keys(one_node)
    entries = [json.loads(line) for r in (0, 1) for line in (run_dir / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
    by_rank = {r: [k for e in entries if e["rank"] == r for k in e["keys"]] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == STEPS * 8
    assert len(set(by_rank[0] + by_rank[1])) == 2 * STEPS * 8  # every sample read once, by one rank
    # Ray's checkpoints went to S3
    stored = [o["Key"] for o in s3.client().list_objects_v2(Bucket="runs", Prefix="ray/").get("Contents", [])]
    assert any(k.endswith("complete.json") for k in stored) and any("rank1.pt" in k for k in stored), stored

    # no credential value in any printed line, file, MLflow param or tag, stored checkpoint or Ray job record
    client = MlflowClient(mlflow.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert run.data.params["tracking.uri"] in ("", "http://***@" + mlflow.uri.removeprefix("http://"))
    traces = {"stdout": proc.stdout, "stderr": proc.stderr, "mlflow params": json.dumps(run.data.params),
              "mlflow tags": json.dumps(run.data.tags),
              "ray jobs": json.dumps(cluster.get("/api/jobs/")) + json.dumps(cluster.get("/api/v0/jobs?detail=1"))}
    assert "pretrain.py" in traces["ray jobs"] and "EXPBLIP_CREDENTIALS_FILE" not in traces["ray jobs"]
    for key in stored:
        traces[f"s3://runs/{key}"] = s3.client().get_object(Bucket="runs", Key=key)["Body"].read().decode("latin-1")
    roots = [run_dir, mlflow.root, cluster.root, *cluster.temp_dirs]  # run files, MLflow's store, Ray's session logs
    files = [f for root in roots for f in Path(root).rglob("*") if f.is_file() and not f.is_symlink()]
    assert len(files) > 50 and any(f.name == "mlflow.db" for f in files)
    traces.update({str(f): f.read_bytes().decode("latin-1") for f in files})
    for secret in (s3.secret, mlflow.password):
        leaks = {where: text[max(0, text.index(secret) - 300): text.index(secret)].replace(secret, "<secret>")
                 for where, text in traces.items() if secret in text}
        assert not leaks, f"a test secret is in {list(leaks)[:5]}, after: {list(leaks.values())[:2]}"
    assert not list(driver_tmp.glob("expblip-credentials-*")), list(driver_tmp.iterdir())  # the file is gone
    shutil.rmtree(driver_tmp, ignore_errors=True)


# ---------------------------------------------------------------- a lost node, and its return


def _steps_done(run_dir: Path) -> int:
    """Steps rank 0 has logged (whole lines of metrics.jsonl; the file is being written)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _wait_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while _steps_done(run_dir) < steps:
        assert proc.poll() is None, f"the run ended before step {steps}:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"step {steps} not reached"
        time.sleep(0.1)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_lost_node_shrinks_the_run_to_one_worker_and_a_restart_with_it_back_grows_to_two(cluster, s3, mlflow,
                                                                                          init_export, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    common = _args("s3://cluster/train", init_export, run_dir, "ray.num_workers=[1, 2]", "ray.max_failures=3",
                   "train.ckpt_every=4", "ray.storage_path=s3://runs/elastic", f"tracking.uri={mlflow.uri}",
                   "tracking.experiment=elastic")
    driver = subprocess.Popen([sys.executable, "launch/pretrain.py", *common, "train.max_steps=24",
                               f"ray.address={cluster.address}"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **s3.env(), **cluster.client_env()})
    try:
        _wait_for(run_dir / "checkpoints" / "step00000008" / "complete.json", driver)
        cluster.kill_raylet(1)  # the worker node is gone, with the rank 1 worker on it
        out, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]
    resized = re.findall(r"resized from 2 to 1 ranks at step (\d+)", out)
    assert len(resized) == 1, out[-4000:]
    shrunk_at = int(resized[0])  # the newest checkpoint when the node went (every 4 steps, from step 8 on)
    assert shrunk_at % 4 == 0 and 8 <= shrunk_at < 24, out[-3000:]
    assert "has been marked dead" in out and "world 1, start step" in out
    assert [m["step"] for m in read_metrics(run_dir)][-1] == 24

    # the node returns; the run, submitted again for two more steps, resumes at world size 2 (asked for 2 workers: an
    # elastic start may begin before Ray counts the new node's CPU, and grow back only a resize interval later)
    cluster.start_worker(1)
    again = _pretrain(cluster, [*common, "train.max_steps=26", "ray.num_workers=2"], env=s3.env())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resized from 1 to 2 ranks at step 24" in again.stdout, again.stdout[-3000:]
    placed = re.search(r"ranks on Ray nodes: rank 0 \w+ \(([\d.]+)\), rank 1 \w+ \(([\d.]+)\)", again.stdout)
    assert placed and {placed[1], placed[2]} == {"127.0.0.2", "127.0.0.3"}  # the returned node has a worker again

    keys = read_keys(run_dir)  # the steps after the checkpoint the lost node's attempt had run count once
    assert sorted(keys) == list(range(1, 27))
    assert [len(keys[s]) for s in sorted(keys)] == [16] * shrunk_at + [8] * (24 - shrunk_at) + [16] * 2
    assert len(_epoch_once(keys)) == EPOCH  # across both changes, every sample of the epoch exactly once
    epoch1 = [k for s in sorted(keys) for k, e in keys[s] if e == 1]
    assert len(epoch1) == 16 * shrunk_at + 8 * (24 - shrunk_at) + 32 - EPOCH == len(set(epoch1))

    client = MlflowClient(mlflow.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])  # one MLflow run
    # a continuous step axis (the steps the lost attempt ran past its checkpoint are logged again by the next)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 27))
    sizes = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size"))
    assert sizes == [(0, 2), (shrunk_at, 1), (24, 2)], sizes
    assert run.data.tags[f"resize.step{shrunk_at:08d}"] == "2->1" and run.data.tags["resize.step00000024"] == "1->2"


# ---------------------------------------------------------------- the deepspeed launcher on two hosts


def test_deepspeed_launcher_on_two_hosts_matches_one_host(one_node, tiny_shards, init_export, tmp_path):  # noqa: F811
    """The hostfile's two hosts run here as two launcher invocations (--no_ssh --node_rank), as on a cluster without
    passwordless ssh; rank 0's host is the master."""
    from conftest import _free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir, port = tmp_path / "run", _free_port()
    args = _args(str(tiny_shards["train"]), init_export, run_dir, f"train.max_steps={STEPS}",
                 f"train.ckpt_every={STEPS}", "tracking.enabled=false")
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "launch/finetune.py", "--deepspeed", "ds_configs/zero3.json", *args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outs[1]  # each launcher started its host's one rank
    assert "world 2" in outs[0]
    assert _losses(run_dir) == pytest.approx(_losses(one_node), rel=1e-4)
    assert read_keys(run_dir) == read_keys(one_node)


# ---------------------------------------------------------------- outages


def test_s3_down_for_30_s_mid_stream_is_waited_out_losing_and_repeating_nothing(tiny_shards, init_export,  # noqa: F811
                                                                                  tmp_path):
    """Each rank holds its shards' samples once read; the next epoch's first reads meet the outage."""
    from services import seaweedfs

    server = seaweedfs(tmp_path / "s3")
    try:
        shards = _upload(server, tiny_shards, "outage")
        run_dir = tmp_path / "run"
        proc = subprocess.Popen(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json",
                                              *_args(shards, init_export, run_dir, "train.max_steps=20",
                                                     "train.ckpt_every=0", "tracking.enabled=false",
                                                     "data.max_outage_s=120")),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **server.env()})
        _wait_steps(run_dir, 6, proc)  # both ranks hold their epoch-0 shards, epoch 1 starts at step 17
        server.down()
        time.sleep(30)
        server.up()
        out, _ = proc.communicate(timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 0, out[-4000:]
    assert "storage unreachable reading s3://outage/train/shard-" in out  # the reads retried...
    assert "storage reachable again after" in out  # ...until the server was back
    keys = read_keys(run_dir)
    assert sorted(keys) == list(range(1, 21)) and all(len(v) == 16 for v in keys.values())
    assert len(_epoch_once(keys)) == EPOCH
    epoch1 = [k for s in sorted(keys) for k, e in keys[s] if e == 1]
    assert len(epoch1) == 4 * 16 and len(set(epoch1)) == len(epoch1)


def test_s3_down_longer_than_max_outage_fails_the_attempt_and_ray_restarts_it_from_the_checkpoint(
        tiny_shards, init_export, tmp_path):  # noqa: F811
    from services import seaweedfs

    server = seaweedfs(tmp_path / "s3")
    run_dir = tmp_path / "run"
    try:
        shards = _upload(server, tiny_shards, "long")
        cmd = [sys.executable, "launch/pretrain.py",
               *_args(shards, init_export, run_dir, "train.max_steps=20", "train.ckpt_every=4",
                      "tracking.enabled=false", "ray.num_workers=2", "ray.max_failures=1", "data.max_outage_s=5")]
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **server.env(), "RAY_memory_monitor_refresh_ms": "0"})
        lines = []
        _wait_for(run_dir / "checkpoints" / "step00000012" / "complete.json", driver)
        server.down()  # epoch 1 (step 17) needs the shards again
        for line in driver.stdout:
            lines.append(line)
            if "the data stream failed at step" in line:
                break
        server.up()
        out = "".join(lines) + driver.communicate(timeout=900)[0]
    finally:
        server.stop()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]
    failed = re.search(r"the data stream failed at step (\d+), so every rank stops \(rank 0: StorageOutage: storage "
                       r"unreachable for \d+ s .*data\.max_outage_s=5.*; rank 1: StorageOutage", out)
    assert failed, out[-4000:]  # both ranks stopped together, each naming the outage
    starts = [int(s) for s in re.findall(r"start step (\d+)", out)]
    assert starts[0] == 0 and starts[1] % 4 == 0 and 12 <= starts[1] < int(failed[1])  # from the last checkpoint
    keys = read_keys(run_dir)
    assert sorted(keys) == list(range(1, 21)) and len(_epoch_once(keys)) == EPOCH
    assert [m["step"] for m in read_metrics(run_dir)][-1] == 20


def test_mlflow_down_mid_run_training_goes_on_and_the_metrics_arrive_later(mlflow, tiny_shards, init_export,  # noqa: F811
                                                                          tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json",
                                          *_args(str(tiny_shards["train"]), init_export, run_dir,
                                                 "train.max_steps=16", "train.ckpt_every=8",
                                                 f"tracking.uri={mlflow.uri}", "tracking.experiment=outage")),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    down = False
    try:
        _wait_steps(run_dir, 1, proc)
        mlflow.down()
        down, before = True, _steps_done(run_dir)
        _wait_steps(run_dir, before + 6, proc)
        stepped_while_down = _steps_done(run_dir) - before
        mlflow.up()
        down = False
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if down:
            mlflow.up()
    assert proc.returncode == 0, out[-4000:]
    assert stepped_while_down >= 6  # training went on while the server was down
    assert "unreachable (" in out and "reachable again after" in out
    client = MlflowClient(mlflow.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 17))
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.003"


# ---------------------------------------------------------------- a kill during a checkpoint write


KILL_AT = 8


def test_sigkill_while_writing_a_checkpoint_leaves_latest_on_the_last_complete_one(tiny_shards, init_export,  # noqa: F811
                                                                                   tmp_path):
    from expblip.train.checkpoint import latest_tag

    run_dir = tmp_path / "run"
    args = _args(str(tiny_shards["train"]), init_export, run_dir, "train.max_steps=12", "train.ckpt_every=4",
                 "tracking.enabled=false", "train.keep_checkpoints=0")
    killed = run_launcher(_this_file(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args)))
    assert killed.returncode != 0
    root = run_dir / "checkpoints"
    partial = root / f"step{KILL_AT:08d}"
    assert (root / "latest").read_text() == "step00000004" and latest_tag(run_dir) == "step00000004"
    assert list(partial.glob("zero_pp_rank_*")) and not (partial / "complete.json").exists()  # written in part
    assert not (partial / "rank0.pt").exists()

    resumed = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "start step 4 of 12" in resumed.stdout
    assert (partial / "complete.json").exists() and (root / "latest").read_text() == "step00000012"
    keys = read_keys(run_dir)  # steps 5-8 were trained twice; the resumed attempt's count
    assert sorted(keys) == list(range(1, 13)) and len(_epoch_once(keys)) == 12 * 16
    state = torch.load(partial / "rank0.pt", weights_only=True)
    assert state["cursor"]["position"] == KILL_AT * 16


def _this_file(cmd: list[str]) -> list[str]:
    cmd[cmd.index("launch/finetune.py")] = str(Path(__file__).resolve())
    return cmd


def _train_dying_in_checkpoint(argv: list[str]) -> int:
    """launch/finetune.py, with rank 0 SIGKILLed in the middle of writing checkpoint KILL_AT: after DeepSpeed's shards,
    before its own state file and complete.json."""
    import torch.distributed as dist

    from expblip.cli import config_parser, parse_config, run_main
    from expblip.train import checkpoint, loop

    parser = config_parser(__doc__)
    parser.add_argument("--deepspeed")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(argv)
    save, real_save = checkpoint.save, torch.save

    def dying(obj, path, *a, **k):
        if str(path).endswith("rank0.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)

    def save_and_die(engine, run_dir, step, *a, **k):
        if step == KILL_AT and dist.get_rank() == 0:
            torch.save = dying
        return save(engine, run_dir, step, *a, **k)

    checkpoint.save = save_and_die
    return run_main(lambda: loop.train(parse_config(args, [f"train.ds_config={args.deepspeed}"])))


if __name__ == "__main__":
    sys.exit(_train_dying_in_checkpoint(sys.argv[1:]))
