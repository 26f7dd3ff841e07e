"""MLflow from rank 0 only; every other rank gets a tracker that does nothing.

One MLflow run per training run: its id is stored in the run directory (and in checkpoints), so a resumed
or restarted run re-attaches to the same MLflow run and the step axis stays continuous.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from expblip.config import ConfigError, TrackingConfig, flatten
from expblip.credentials import redact_uri

GIT_ENV = "EXPBLIP_GIT_COMMIT"


class NullTracker:
    """Stand-in for ranks other than 0 and for tracking.enabled=false."""

    run_id: str | None = None
    uri: str = ""
    display_uri: str = ""

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def log_artifacts(self, directory: str | Path, folder: str | None = None) -> None: ...
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
        host = urlparse(uri).hostname
        raise ConfigError(f"MLflow tracking server {redact_uri(uri)} is unreachable ({err}); start it (make mlflow) "
                          f"or set tracking.uri / MLFLOW_TRACKING_URI to a reachable server (host {host})") from None


class MlflowTracker:
    """Rank 0's link to MLflow, through an MlflowClient bound to one URI.

    No process-wide MLflow state is touched (mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for the
    rest of the process and its children), so several runs in one process (a pipeline) each keep their own store.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, run_id: str | None = None):
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg, run_dir)
        self.display_uri = redact_uri(self.uri)
        self.client = MlflowClient(self.uri)
        id_file = Path(run_dir) / "mlflow_run.json"
        run_id = run_id or (json.loads(id_file.read_text())["run_id"] if id_file.is_file() else None)
        if run_id:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(_experiment_id(self.client, cfg.experiment),
                                                 run_name=cfg.run_name or Path(run_dir).name,
                                                 tags=_parent_tag(cfg)).info.run_id
        id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.display_uri}))
        self.system = _system_monitor(self.run_id, self.uri, cfg.system_metrics_every_s)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]  # params are immutable once logged
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_artifacts(self, directory: str | Path, folder: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=folder)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.finish()
            self.system = None
        self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _parent_tag(cfg: TrackingConfig) -> dict:
    return {"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else {}


def _system_monitor(run_id: str, uri: str, every_s: float):
    """MLflow's own sampler (CPU, memory, disk, network; GPU when there is one) as system/* metrics, or None."""
    if every_s <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def git_commit() -> str:
    """$EXPBLIP_GIT_COMMIT (set by a driver for workers without the repository), else HEAD of the checkout that
    holds this package ('-dirty' when it has uncommitted changes), else 'unknown'."""
    if os.environ.get(GIT_ENV):
        return os.environ[GIT_ENV]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def make_tracker(cfg: TrackingConfig, run_dir: str | Path, rank: int, run_id: str | None = None):
    """MlflowTracker on rank 0 when enabled, NullTracker elsewhere."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, run_id)
