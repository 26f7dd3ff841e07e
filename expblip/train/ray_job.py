"""Ray Train wiring: the same loop (expblip.train.loop.train) on a TorchTrainer's workers.

Ray creates the process group (gloo on CPU, NCCL on GPU) and sets RANK/WORLD_SIZE; each worker binds the device
Ray gave it and adds the host group (expblip.train.comm) before its first collective; deepspeed.init_distributed
wraps Ray's group. Checks that can fail fast run on the driver, before any worker starts.

The console: by default the driver shows expblip's own lines only, each once, and one progress line (a bar on a
terminal) per stage. Workers log through ``expblip.log`` into a relay (a small Ray actor) that the driver drains;
Ray's own worker and controller output is not forwarded (``ray.init(log_to_driver=False)``). A failure still
raises on the driver with the worker's traceback. ``ray.verbose=true`` (``--verbose``) forwards Ray's output instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from expblip.config import COLLECTIVE_TIMEOUT_S, Config, ConfigError, from_dict, to_dict
from expblip.credentials import (
    has_userinfo,
    load_credentials,
    redact_uri,
    remove_credentials,
    secret_env,
    strip_userinfo,
    write_credentials,
)
from expblip.log import get_logger, setup_logging
from expblip.train.console import Console, RelayHandler
from expblip.train.tracking import GIT_ENV, check_reachable, driver_run_id, git_commit, tracking_uri

log = get_logger(__name__)

# Variables the workers need to see as the driver does, through Ray's runtime_env. None of them is a secret: Ray
# stores the runtime_env with the job and shows it on the dashboard. Credentials (expblip.credentials.SECRET_ENV, a
# tracking URI with a password) reach workers from their own environment or from a 0600 file (ray.credentials).
FORWARDED_ENV = ("DS_ACCELERATOR", "PYTHONWARNINGS", "OMP_NUM_THREADS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", GIT_ENV)


def absolute_paths(cfg: Config) -> Config:
    """Workers run in another directory: make every local path in the config absolute."""

    def fix(path: str) -> str:
        return path if not path or "://" in path else str(Path(path).resolve())

    data = dataclasses.replace(cfg.data, train=dataclasses.replace(cfg.data.train, shards=fix(cfg.data.train.shards)),
                               eval=dataclasses.replace(cfg.data.eval, shards=fix(cfg.data.eval.shards)))
    train = dataclasses.replace(cfg.train, run_dir=fix(cfg.train.run_dir), ds_config=fix(cfg.train.ds_config))
    model = dataclasses.replace(cfg.model, weights=fix(cfg.model.weights), tokenizer=fix(cfg.model.tokenizer),
                                vision_weights=fix(cfg.model.vision_weights), lm_weights=fix(cfg.model.lm_weights))
    return dataclasses.replace(cfg, data=data, train=train, model=model)


def preflight(cfg: Config) -> None:
    """Fail on the driver, naming the thing: shards, DeepSpeed config, tracking server."""
    from expblip.train.loop import preflight as loop_preflight

    loop_preflight(cfg, wait_for_storage=False)
    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking, cfg.train.run_dir))
    if "://" in cfg.ray.storage_path:
        check_storage(cfg.ray.storage_path)


def check_storage(url: str) -> None:
    """Fail fast when Ray's checkpoint storage (e.g. s3://bucket/prefix) cannot be reached or does not exist."""
    from expblip.data.shards import url_to_fs

    try:
        fs, path = url_to_fs(url)
        bucket = path.split("/")[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket} does not exist")
    except Exception as err:  # s3fs raises many kinds: connection, credentials, missing bucket
        raise ConfigError(f"ray.storage_path {url} is unreachable ({type(err).__name__}: {err}); create the bucket "
                          "or fix AWS_ENDPOINT_URL / credentials") from err


def _worker(config: dict) -> None:
    import ray.train

    from expblip.train.loop import train

    load_credentials(config.get("credentials") or None)
    cfg = from_dict(Config, config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    relay = config.get("console")
    setup_logging(rank, RelayHandler(relay) if relay is not None else None)
    _bind_ray_device()  # before the first collective (_log_placement's)
    _log_placement(rank)
    _restore_from_ray(cfg)

    def report(metrics: dict, step: int, path) -> None:
        scalars = {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "step": step}
        if path is None:
            ray.train.report(scalars)
            return
        stage = _stage_rank_files(Path(path), ray.train.get_context().get_world_rank())
        try:  # every rank reports its own shards; Ray merges them into one checkpoint in storage
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(str(stage)))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    train(cfg, report=report)


def _bind_ray_device() -> None:
    """This worker computes on the device Ray assigned it (a node's workers share CUDA_VISIBLE_DEVICES, so it need
    not be cuda:LOCAL_RANK); comm.bind_device points LOCAL_RANK at it, which DeepSpeed's engine binds again. Then
    the host group, on which every exchange of ours travels."""
    import ray.train.torch

    from expblip.train import comm

    device = comm.bind_device(ray.train.torch.get_device())
    comm.init_distributed()
    log.debug(f"worker bound to {device}")


def _log_placement(rank: int) -> None:
    """Collective: rank 0 says which Ray node each rank runs on."""
    import ray

    from expblip.train import comm

    here = f"{ray.get_runtime_context().get_node_id()[:12]} ({ray.util.get_node_ip_address()})"
    nodes = comm.all_gather_object(here)
    log.info("ranks on Ray nodes: " + ", ".join(f"rank {r} {n}" for r, n in enumerate(nodes)))


def _belongs_to(name: str, rank: int) -> bool:
    """DeepSpeed's per-rank files (zero_pp_rank_R_*, our rankR.pt) go with rank R; shared files with rank 0."""
    match = re.search(r"rank_?(\d+)", name)
    return int(match.group(1)) == rank if match else rank == 0


def _stage_rank_files(tag_dir: Path, rank: int) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=f"expblip-ckpt-rank{rank}-"))
    (stage / tag_dir.name).mkdir()
    for file in tag_dir.iterdir():
        if file.is_file() and _belongs_to(file.name, rank):
            shutil.copy2(file, stage / tag_dir.name / file.name)
    if rank == 0:
        (stage / "latest").write_text(tag_dir.name)
    return stage


def _restore_from_ray(cfg: Config) -> None:
    """A restarted or re-submitted run on a machine whose run_dir lacks the newest checkpoint fetches it from
    Ray's storage (checkpoints are then found where the loop always looks: run_dir/checkpoints)."""
    import ray.train

    from expblip.train import comm
    from expblip.train.checkpoint import checkpoint_root, is_complete

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and ray.train.get_context().get_local_rank() == 0:
        root = checkpoint_root(cfg.train.run_dir)
        with checkpoint.as_directory() as src:
            tag = Path(src, "latest").read_text().strip()
            if not is_complete(root / tag):  # absent here, or a partial copy: copy aside, then move into place
                root.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
                shutil.copytree(Path(src, tag), staging / tag)
                shutil.rmtree(root / tag, ignore_errors=True)
                try:
                    (staging / tag).rename(root / tag)
                except OSError:  # another node's worker did the same on a shared volume first
                    pass
                shutil.rmtree(staging, ignore_errors=True)
    comm.barrier()


QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # a print in a worker goes to stdout once, not also via a logger


def init_ray(address: str = "", verbose: bool = False) -> None:
    """Start a local Ray, or attach to ``address`` / the cluster of $RAY_ADDRESS; the workers see FORWARDED_ENV.

    Quiet unless ``verbose``: Ray logs warnings only on the driver and does not forward worker output (expblip's
    lines come through expblip.train.console). A second call is a no-op.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
    # Inside `ray job submit` the job's runtime_env already reaches every worker, and Ray 2.60 refuses to merge a
    # driver runtime_env that repeats one of its variables ("Failed to merge the Job's runtime env"): forward only the others.
    if any(has_userinfo(arg.split("=", 1)[-1]) for arg in sys.argv):
        log.warning("a password is on this command line: every user of this machine can list it, and Ray records the "
                    "command as the job's entrypoint. Pass it in MLFLOW_TRACKING_URI or a --config file instead")
    os.environ.setdefault(GIT_ENV, git_commit())  # workers may run from a copy without .git
    env = {k: v for k, v in {**forwarded_env(), **QUIET_ENV}.items() if k not in _job_env_vars()}
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)  # the driver's own Ray lines (cluster start, Train V2)
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, ignore_reinit_error=True,
             include_dashboard=False if address == "local" else None, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)


def forwarded_env(environ: dict | None = None) -> dict[str, str]:
    """FORWARDED_ENV as set here, less anything that holds a secret (a tracking URI with a password)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in FORWARDED_ENV if k in environ and not has_userinfo(environ[k])}


def _one_machine() -> bool:
    """Whether every node of the attached Ray cluster runs on this machine (so a file here reaches every worker):
    at this driver's address, or at a loopback one."""
    import ipaddress

    import ray

    here = ray.util.get_node_ip_address()
    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    return all(a == here or ipaddress.ip_address(a).is_loopback for a in addresses)


@contextmanager
def worker_credentials(cfg: Config, mode: str):
    """(the config the workers get, the path of the credentials file or ''), for the duration of the block.

    file: this process's secret variables and a tracking URI with a password go into a 0600 file that is removed at
    the end; the workers' tracking.uri is then '' ($MLFLOW_TRACKING_URI from the file). environment: nothing is
    passed; a tracking.uri with a password loses it (the workers authenticate with MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD of their own environment).
    """
    uri = cfg.tracking.uri
    if mode == "environment":
        if has_userinfo(uri):
            log.warning(f"tracking.uri {redact_uri(uri)}: its password is not sent to the workers "
                        "(ray.credentials=environment); they authenticate from their own environment")
            cfg = _with_tracking_uri(cfg, strip_userinfo(uri))
        yield cfg, ""
        return
    values = secret_env()
    if has_userinfo(uri):
        values["MLFLOW_TRACKING_URI"] = uri
        cfg = _with_tracking_uri(cfg, "")
    path = write_credentials(values)
    try:
        yield cfg, str(path)
    finally:
        remove_credentials(path)


def _with_tracking_uri(cfg: Config, uri: str) -> Config:
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=uri))


def _in_filesystem(storage: str) -> str:
    """Ray's storage_path: within storage_filesystem (bucket/prefix) when there is one."""
    return storage.split("://", 1)[1] if storage.startswith(("s3://", "s3a://")) else storage


def storage_filesystem(storage: str, credentials: str = ""):
    """Ray's storage as a pyarrow filesystem for s3:// paths (None elsewhere): an fsspec S3 filesystem that finds
    the endpoint in $AWS_ENDPOINT_URL and its keys where the workers' are (their environment, or the credentials
    file), in every process that unpickles it: workers and Ray Train's controller."""
    if not storage.startswith(("s3://", "s3a://")):
        return None
    import pyarrow.fs

    from expblip.train.storage import CredentialedS3

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(CredentialedS3(credentials=credentials)))


def _job_env_vars() -> set[str]:
    """Variables the submitted job's runtime_env already sets (empty outside `ray job submit`)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    return set((job.get("runtime_env") or {}).get("env_vars") or {})


def run(cfg: Config):
    """Train `cfg` on Ray; returns Ray's Result (its metrics are rank 0's last report)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    preflight(cfg)
    init_ray(cfg.ray.address, cfg.ray.verbose)
    if cfg.tracking.enabled:  # one MLflow run for every attempt and resize, whichever node rank 0 lands on
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
            cfg.tracking, run_id=driver_run_id(cfg.tracking, cfg.train.run_dir)))
    mode = cfg.ray.credentials if cfg.ray.credentials != "auto" else "file" if _one_machine() else "environment"
    log.info(f"credentials reach the workers from {'a 0600 file' if mode == 'file' else 'their own environment'} "
             f"(ray.credentials={cfg.ray.credentials})")
    storage = cfg.ray.storage_path or str(Path(cfg.train.run_dir, "ray").resolve())
    console = None if cfg.ray.verbose else Console(Path(cfg.train.run_dir).name)
    with worker_credentials(cfg, mode) as (worker_cfg, credentials):
        trainer = TorchTrainer(
            train_loop_per_worker=_worker,
            train_loop_config={"cfg": to_dict(worker_cfg), "console": console.actor if console else None,
                               "credentials": credentials},
            torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=cfg.ray.resize_check_s),
            run_config=RunConfig(name=Path(cfg.train.run_dir).name, storage_path=_in_filesystem(storage),
                                 storage_filesystem=storage_filesystem(storage, credentials),
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None)),
        )
        with console or _nothing():
            result = trainer.fit()
    if result.error:
        raise result.error
    return result


def _nothing():
    from contextlib import nullcontext

    return nullcontext()

