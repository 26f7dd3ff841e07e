"""MLflow from rank 0 only; every other rank gets a tracker that does nothing.

One MLflow run per training run: its id is stored in the run directory (and in checkpoints), so a resumed
or restarted run re-attaches to the same MLflow run and the step axis stays continuous.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from expblip.config import ConfigError, TrackingConfig, flatten


class NullTracker:
    """Stand-in for ranks other than 0 and for tracking.enabled=false."""

    run_id: str | None = None
    uri: str = ""

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else SQLite under the run directory."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any worker starts, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    health = uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(health, timeout=timeout).read()
    except OSError as err:
        host = urlparse(uri).netloc
        raise ConfigError(f"MLflow tracking server {uri} is unreachable ({err}); start it (make mlflow) or set "
                          f"tracking.uri / MLFLOW_TRACKING_URI to a reachable server (host {host})") from err


class MlflowTracker:
    """Rank 0's link to MLflow."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, run_id: str | None = None):
        import mlflow

        self._mlflow = mlflow
        self.uri = tracking_uri(cfg, run_dir)
        mlflow.set_tracking_uri(self.uri)
        id_file = Path(run_dir) / "mlflow_run.json"
        run_id = run_id or (json.loads(id_file.read_text())["run_id"] if id_file.is_file() else None)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=False)
        else:
            mlflow.set_experiment(cfg.experiment)
            tags = {"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else None
            self.run = mlflow.start_run(run_name=cfg.run_name or Path(run_dir).name, tags=tags)
        self.run_id = self.run.info.run_id
        id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}))

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        existing = self._mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in flat.items() if k not in existing}  # params are immutable once logged
        if new:
            self._mlflow.log_params(new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(cfg: TrackingConfig, run_dir: str | Path, rank: int, run_id: str | None = None):
    """MlflowTracker on rank 0 when enabled, NullTracker elsewhere."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, run_id)
