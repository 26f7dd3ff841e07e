"""cluster/: the Ray and KubeRay specs parse, name only files that exist, carry command lines the strict config
loader accepts, use only Ray's runtime_env keys, pass Ray's cluster-launcher schema — and the runtime_env really
trains through `ray job submit` on a real Ray head (slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SPECS = ("runtime_env.yaml", "ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml",
         "serve.yaml")  # serve.yaml: Ray Serve, checked by tests/test_ray_serve.py
SECRET = "expblip-env"
SECRET_KEYS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:launch|recipes|ds_configs|expblip|tests)/[\w./-]*\.(?:py|yaml|json))")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _kuberay_clusters() -> dict[str, dict]:
    """The RayCluster spec of each KubeRay file (a RayJob carries its own under rayClusterSpec)."""
    return {"kuberay-raycluster.yaml": _load("kuberay-raycluster.yaml")["spec"],
            "kuberay-rayjob.yaml": _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]}


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _command_texts() -> list[tuple[str, str]]:
    """(file, text) of every place a command line is written: README's fenced blocks, YAML comments."""
    texts = [("README.md", block) for block in re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(),
                                                          flags=re.S)]
    for name in SPECS:
        comments = [line.split("#", 1)[1][1:] for line in (CLUSTER / name).read_text().splitlines()
                    if line.lstrip().startswith("#")]
        texts.append((name, "\n".join(comments)))
    return texts


def _python_commands() -> list[tuple[str, list[str]]]:
    """Every `python launch/...` command line of cluster/ as argv: documented ones and the RayJob's entrypoint."""
    found = [("kuberay-rayjob.yaml", _load("kuberay-rayjob.yaml")["spec"]["entrypoint"])]
    for name, text in _command_texts():
        for line in text.replace("\\\n", " ").splitlines():
            if "python launch/" in line:
                found.append((name, line[line.index("python launch/"):]))
    return [(name, shlex.split(command)) for name, command in found]


def _config_of(argv: list[str]):
    from expblip.cli import config_parser
    from expblip.config import load_config

    args = config_parser("").parse_args(argv[2:])
    return load_config(REPO / args.config if args.config else None, list(args.overrides))


# ---------------------------------------------------------------- parsing and paths


def test_every_yaml_parses_and_the_specs_are_all_there():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted(SPECS)
    for name in SPECS:
        assert isinstance(_load(name), dict), name
    embedded = yaml.safe_load(_load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert isinstance(embedded, dict) and embedded["env_vars"]


def test_every_repository_path_named_exists():
    named = set()
    for path in CLUSTER.iterdir():
        named |= {(path.name, m) for m in REPO_PATH.findall(path.read_text())}
    assert {m for _, m in named} >= {"launch/pretrain.py", "recipes/paper_stage2.yaml", "recipes/tiny_vision.yaml",
                                     "ds_configs/zero3.json"}
    missing = [(name, m) for name, m in sorted(named) if not (REPO / m).is_file()]
    assert not missing, f"paths named in cluster/ that do not exist: {missing}"


def test_every_command_line_runs_an_existing_script_with_a_config_that_loads():
    commands = _python_commands()
    assert len(commands) >= 5, commands
    for name, argv in commands:
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), (name, argv[:2])
        assert argv[1] == "launch/pretrain.py", f"{name}: only the Ray launcher belongs on a cluster: {argv[1]}"
        cfg = _config_of(argv)  # strict: an unknown key or a wrong type raises, naming the key
        assert cfg.ray.address == "auto", f"{name}: say ray.address=auto (local would start a Ray in the job): {argv}"
        assert cfg.ray.use_gpu, f"{name}: a GPU cluster command without ray.use_gpu=true: {argv}"
        # runs/ and demo/ are not uploaded (excludes) and not on the nodes: data and weights come from S3 or volumes.
        for key, value in (("data.train.shards", cfg.data.train.shards), ("model.weights", cfg.model.weights),
                           ("train.run_dir", cfg.train.run_dir)):
            assert not value or "://" in value or Path(value).is_absolute(), f"{name}: {key}={value} is local: {argv}"


def test_rayjob_asks_for_no_more_workers_than_its_gpus():
    job = _load("kuberay-rayjob.yaml")
    cfg = _config_of(shlex.split(job["spec"]["entrypoint"]))
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * group["replicas"]
               for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
               for c in group["template"]["spec"]["containers"])
    assert cfg.ray.use_gpu and 1 <= cfg.ray.num_workers <= gpus
    assert cfg.ray.storage_path.startswith("s3://") and cfg.model.preset != "tiny"
    assert Path(cfg.train.run_dir).is_absolute() and cfg.train.run_dir.startswith("/shared/")


# ---------------------------------------------------------------- runtime_env


def test_runtime_env_uses_only_rays_keys(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    spec = _load("runtime_env.yaml")
    assert set(spec) <= RuntimeEnv.known_fields, set(spec) - RuntimeEnv.known_fields
    monkeypatch.chdir(REPO)  # working_dir "." is the checkout ray job submit runs from
    RuntimeEnv(**spec)  # Ray's own validation: types, env_vars as str -> str, working_dir exists
    env = spec["env_vars"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(env)
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert "DS_ACCELERATOR" not in env, "DeepSpeed must detect CUDA on GPU nodes"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), "no secrets in git"
    assert {"runs/", "demo/", ".venv/"} <= set(spec["excludes"])


def test_rayjob_runtime_env_uses_only_rays_keys():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(_load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert set(spec) <= RuntimeEnv.known_fields, set(spec) - RuntimeEnv.known_fields
    assert Path(spec.pop("working_dir")).is_absolute()  # a path inside the image, not on this machine
    RuntimeEnv(**spec)
    assert spec["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1" and "DS_ACCELERATOR" not in spec["env_vars"]


# ---------------------------------------------------------------- cluster launcher


def test_cluster_launcher_yaml_passes_rays_schema():
    import jsonschema
    import ray
    import ray.autoscaler

    spec = _load("ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(spec, schema)
    assert spec["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-"), "Ray on nodes = Ray here"
    assert spec["head_node_type"] in spec["available_node_types"]
    gpu_types = {t["node_config"]["InstanceType"] for name, t in spec["available_node_types"].items()
                 if name != spec["head_node_type"]}
    assert gpu_types == {"p4d.24xlarge", "p5.48xlarge"}  # 8 x A100, 8 x H100
    setup = " ".join(spec["setup_commands"])
    assert "pip install -q -e ~/expblip" in setup and spec["file_mounts"]["~/expblip"] == "."
    assert "unset DS_ACCELERATOR" in setup and "MLFLOW_TRACKING_URI" in setup
    assert all("RAY_AUTH_MODE=token" in " ".join(spec[k]) for k in ("head_start_ray_commands",
                                                                    "worker_start_ray_commands"))


# ---------------------------------------------------------------- KubeRay


def test_kuberay_specs_are_consistent():
    import ray

    readme = (CLUSTER / "README.md").read_text()
    for name, cluster in _kuberay_clusters().items():
        assert _load(name)["apiVersion"] == "ray.io/v1", name
        assert cluster["rayVersion"] == ray.__version__, name
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{name}: strings only"
        containers = _containers(cluster)
        assert len({c["image"] for c in containers}) == 1, f"{name}: head and workers must share one image"
        for c in containers:
            assert {"secretRef": {"name": SECRET}} in c["envFrom"], f"{name}/{c['name']}: env from {SECRET}"
            assert "DS_ACCELERATOR" not in {e["name"] for e in c.get("env", [])}
        workers = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
        for c in workers:
            assert c["resources"]["requests"] == c["resources"]["limits"], f"{name}: GPU pods are Guaranteed"
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 8
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: no training on the head"
        assert containers[0]["image"] in readme, f"{name}: the image is documented"
    assert f"kubectl create secret generic {SECRET}" in readme
    assert all(f"--from-literal={key}=" in readme for key in SECRET_KEYS), "every Secret key is documented"


# ---------------------------------------------------------------- end to end on a real Ray head


def _submit(address: str, runtime_env: Path, entrypoint: list[str]) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", "--address", address, "--runtime-env", str(runtime_env), "--working-dir", ".",
           "--", *entrypoint]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


@pytest.mark.slow  # a Ray head + 2 ZeRO-3 workers through `ray job submit` (~1.5-3 min, ~4 GB)
def test_runtime_env_job_trains_on_a_ray_head(tmp_path, tiny_shards, mlflow_server):
    from mlflow import MlflowClient
    from services import port_open, ray_head

    # cluster/runtime_env.yaml as shipped, pointed at this machine's services; CPU instead of GPU.
    spec = _load("runtime_env.yaml")
    spec["env_vars"].update(MLFLOW_TRACKING_URI=mlflow_server, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    del spec["env_vars"]["AWS_ENDPOINT_URL"]  # shards are local here
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    entrypoint = ["python", "launch/pretrain.py", "--config", "recipes/tiny_vision.yaml",  # needs no earlier stage
                  f"data.train.shards={tiny_shards['train']}", f"train.run_dir={run_dir}", "train.max_steps=2",
                  "train.log_every=1", "train.ckpt_every=0", "tracking.experiment=cluster-e2e", "ray.address=auto",
                  "ray.num_workers=2", "data.train.batch_size=8"]

    address, stop = ray_head(tmp_path / "ray")
    try:
        result = _submit(address, runtime_env, entrypoint)
        with urllib.request.urlopen(f"{address}/api/v0/actors?limit=1000", timeout=30) as resp:
            actors = json.loads(resp.read())["data"]["result"]["result"]
    finally:
        stop()
    assert not port_open(address)  # the head is gone once stopped
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # `ray job submit` follows the job's logs: they show the training steps, and the job succeeds
    # one progress line per step here (expblip.train.console: "[expblip] <run>: step N/M ...")
    for n in (1, 2):
        assert re.search(rf"^\[expblip\] \S+: step {n}/2 ", result.stdout, re.M), result.stdout[-4000:]
    assert "[expblip] finished" in result.stdout and "succeeded" in result.stdout.lower()
    # The training workers ran on this head's cluster (ray.address=auto), not on a Ray started inside the job.
    assert sum(a["class_name"] == "RayTrainWorker" for a in actors) == 2, {a["class_name"] for a in actors}
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("cluster-e2e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["ray.address"] == "auto"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_the_clusters_gpu_job_runs_the_gpu_policy():
    """The RayJob trains with the paper recipe's policy (bf16 frozen towers and compute, placement and activation
    checkpointing decided by plan.py), not a tiny CPU recipe's fp32."""
    from expblip.train.engine import load_ds_config, precision

    cfg = _config_of(shlex.split(_load("kuberay-rayjob.yaml")["spec"]["entrypoint"]))
    assert cfg.model.preset == "vitg-opt2.7b" and cfg.model.frozen_dtype == "bfloat16" and cfg.ray.use_gpu
    assert cfg.train.placement == "auto" and cfg.train.activation_checkpointing == "auto"
    assert precision(load_ds_config(cfg.train.ds_config)) == "bf16"
