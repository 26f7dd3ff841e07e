"""Ray Train wiring: the same loop (expblip.train.loop.train) on a TorchTrainer's workers.

Ray creates the process group (gloo on CPU, NCCL on GPU) and sets RANK/WORLD_SIZE; the loop's
deepspeed.init_distributed wraps it. Checks that can fail fast run on the driver, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from expblip.config import Config, ConfigError, from_dict, to_dict
from expblip.train.tracking import check_reachable, tracking_uri

# Variables the workers need to see as the driver does (never logged: they may hold credentials).
FORWARDED_ENV = ("DS_ACCELERATOR", "PYTHONWARNINGS", "OMP_NUM_THREADS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")


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


def _worker(config: dict) -> None:
    import ray.train

    from expblip.train.loop import train

    def report(metrics: dict, step: int, path) -> None:
        ray.train.report({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "step": step})

    train(from_dict(Config, config["cfg"]), report=report)


def _init_ray(cfg: Config) -> None:
    import ray

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(address=address, runtime_env={"env_vars": env}, ignore_reinit_error=True,
             include_dashboard=False if address == "local" else None)


def run(cfg: Config):
    """Train `cfg` on Ray; returns Ray's Result (its metrics are rank 0's last report)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    preflight(cfg)
    _init_ray(cfg)
    storage = cfg.ray.storage_path or str(Path(cfg.train.run_dir, "ray").resolve())
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=Path(cfg.train.run_dir).name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def check_config(cfg: Config) -> None:
    if cfg.ray.num_workers < 1:
        raise ConfigError("ray.num_workers must be >= 1")
