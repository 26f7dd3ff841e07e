"""Ray Train wiring: the same loop (expblip.train.loop.train) on a TorchTrainer's workers.

Ray creates the process group (gloo on CPU, NCCL on GPU) and sets RANK/WORLD_SIZE; the loop's
deepspeed.init_distributed wraps it. Checks that can fail fast run on the driver, before any worker starts.

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
import tempfile
from pathlib import Path

from expblip.config import Config, ConfigError, from_dict, to_dict
from expblip.log import setup_logging
from expblip.train.console import Console, RelayHandler
from expblip.train.tracking import GIT_ENV, check_reachable, git_commit, tracking_uri

# Variables the workers need to see as the driver does (never logged: they may hold credentials).
FORWARDED_ENV = ("DS_ACCELERATOR", "PYTHONWARNINGS", "OMP_NUM_THREADS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", GIT_ENV)


def absolute_paths(cfg: Config) -> Config:
    """Workers run in another directory: make every local path in the config absolute."""

    def fix(path: str) -> str:
        return path if not path or "://" in path else str(Path(path).resolve())

    data = dataclasses.replace(cfg.data, train=dataclasses.replace(cfg.data.train, shards=fix(cfg.data.train.shards)),
                               eval=dataclasses.replace(cfg.data.eval, shards=fix(cfg.data.eval.shards)))
    train = dataclasses.replace(cfg.train, run_dir=fix(cfg.train.run_dir), ds_config=fix(cfg.train.ds_config))
    model = dataclasses.replace(cfg.model, weights=fix(cfg.model.weights), tokenizer=fix(cfg.model.tokenizer))
    return dataclasses.replace(cfg, data=data, train=train, model=model)


def preflight(cfg: Config) -> None:
    """Fail on the driver, naming the thing: shards, DeepSpeed config, tracking server."""
    from expblip.train.loop import preflight as loop_preflight

    loop_preflight(cfg)
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

    cfg = from_dict(Config, config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    relay = config.get("console")
    setup_logging(rank, RelayHandler(relay) if relay is not None else None)
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
    import torch.distributed as dist

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and ray.train.get_context().get_local_rank() == 0:
        root = Path(cfg.train.run_dir, "checkpoints")
        with checkpoint.as_directory() as src:
            tag = Path(src, "latest").read_text().strip()
            if not (root / tag).is_dir():
                shutil.copytree(Path(src, tag), root / tag)
                (root / "latest").write_text(tag)
    if dist.is_initialized():
        dist.barrier()


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
    os.environ.setdefault(GIT_ENV, git_commit())  # workers may run from a copy without .git
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env = {k: v for k, v in {**forwarded, **QUIET_ENV}.items() if k not in _job_env_vars()}
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)  # the driver's own Ray lines (cluster start, Train V2)
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, ignore_reinit_error=True,
             include_dashboard=False if address == "local" else None, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)


def _job_env_vars() -> set[str]:
    """Variables the submitted job's runtime_env already sets (empty outside `ray job submit`)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    return set((job.get("runtime_env") or {}).get("env_vars") or {})


def run(cfg: Config):
    """Train `cfg` on Ray; returns Ray's Result (its metrics are rank 0's last report)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    preflight(cfg)
    init_ray(cfg.ray.address, cfg.ray.verbose)
    storage = cfg.ray.storage_path or str(Path(cfg.train.run_dir, "ray").resolve())
    console = None if cfg.ray.verbose else Console(Path(cfg.train.run_dir).name)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": to_dict(cfg), "console": console.actor if console else None},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=Path(cfg.train.run_dir).name, storage_path=storage,
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

