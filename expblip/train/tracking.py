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
from urllib.parse import unquote, urlparse

from expblip.config import ConfigError, TrackingConfig, flatten
from expblip.credentials import redact_uri, strip_userinfo
from expblip.log import get_logger

log = get_logger(__name__)

GIT_ENV = "EXPBLIP_GIT_COMMIT"
RUN_FILE = "mlflow_run.json"  # in the run directory: its MLflow run (eval.report reads it as MLFLOW_RUN_FILE)


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
    import base64
    import urllib.request

    parts = urlparse(uri)  # urllib takes no user:password in a URL: they go into a basic-auth header
    request = urllib.request.Request(strip_userinfo(uri).rstrip("/") + "/health")
    if parts.username or parts.password:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout).read()
    except OSError as err:
        host = urlparse(uri).hostname
        raise ConfigError(f"MLflow tracking server {redact_uri(uri)} is unreachable ({err}); start it (make mlflow) "
                          f"or set tracking.uri / MLFLOW_TRACKING_URI to a reachable server (host {host})") from None


class MlflowTracker:
    """Rank 0's link to MLflow, through an MlflowClient bound to one URI.

    No process-wide MLflow state is touched (mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for the
    rest of the process and its children), so several runs in one process (a pipeline) each keep their own store.

    Training never waits on the server: params, metrics, tags and artefacts go through a queue that a thread sends in
    order (``Outbox``). While the server is unreachable they stay queued (up to ``MAX_QUEUED`` metric values; beyond,
    the oldest metrics are dropped and counted) and go out when it answers again; ``close`` waits up to
    ``tracking.flush_timeout_s`` for the rest, then reports what was dropped (it is still in metrics.jsonl).
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, run_id: str | None = None):
        from mlflow import MlflowClient

        _bounded_http_retries()
        self.uri = tracking_uri(cfg, run_dir)
        self.display_uri = redact_uri(self.uri)
        if self.display_uri != self.uri:  # MLflow prints "View run at: <uri>/#/..." at the end, password included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(self.uri)
        self.outbox = Outbox(self.client, self.display_uri)
        id_file = Path(run_dir) / RUN_FILE
        run_id = run_id or cfg.run_id or (json.loads(id_file.read_text())["run_id"] if id_file.is_file() else None)
        self.run_id = run_id or create_run(self.client, cfg, run_dir)
        self.outbox.run_id = self.run_id
        if run_id:  # re-attach; when the server is out right now, the status change waits in the outbox
            self.outbox.put("status", {"status": "RUNNING"}, now=True)
        write_run_file(id_file, self.run_id, self.uri)
        self.system = _system_monitor(self.run_id, self.uri, cfg.system_metrics_every_s)
        self.flush_timeout_s = cfg.flush_timeout_s

    def log_params(self, params: dict) -> None:
        self.outbox.put("params", {k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.outbox.put("metrics", [Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.outbox.put("artifact", (str(path), folder))

    def log_artifacts(self, directory: str | Path, folder: str | None = None) -> None:
        self.outbox.put("artifacts", (str(directory), folder))

    def set_tags(self, tags: dict) -> None:
        self.outbox.put("tags", {k: str(v) for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.finish()
            self.system = None
        self.outbox.put("terminated", {"status": status})
        self.outbox.close(self.flush_timeout_s)


MAX_QUEUED = 200_000  # metric values held while the server is out (a few tens of MB)
RETRY_S = (1.0, 30.0)  # first and longest wait between tries while the server is out


def _bounded_http_retries() -> None:
    """MLflow's HTTP client retries a refused connection for minutes (7 tries, back-off 2); the outbox retries by
    itself, so each call gives up sooner. Set only where unset (the user's choice wins)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Outbox:
    """Sends (kind, payload) items to one MLflow run in order, from a thread; keeps them while the server is out."""

    def __init__(self, client, display_uri: str) -> None:
        import threading
        from collections import deque

        self.client, self.display_uri, self.run_id = client, display_uri, None
        self.items: deque = deque()
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.dropped, self.down_since, self.closed = 0, None, threading.Event()
        self.thread = threading.Thread(target=self._loop, name="expblip-mlflow-outbox", daemon=True)
        self.thread.start()

    def put(self, kind: str, payload, now: bool = False) -> None:
        """Queue an item; ``now``: try it in the caller first (a failure leaves it queued)."""
        if now:
            try:
                self._send_one(kind, payload)
                return
            except Exception:  # unreachable: the thread retries it once run_id is set
                pass
        with self.lock:
            self.items.append((kind, payload))
            queued = sum(len(p) for k, p in self.items if k == "metrics")
            while queued > MAX_QUEUED:  # the oldest metrics go first; params, tags and artefacts stay
                index = next(i for i, (k, _) in enumerate(self.items) if k == "metrics")
                queued -= len(self.items[index][1])
                self.dropped += len(self.items[index][1])
                del self.items[index]
        self.wake.set()

    def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the queue to empty; what is left is dropped and counted."""
        self.closed.set()
        self.wake.set()
        self.thread.join(timeout_s)
        with self.lock:
            left = sum(len(p) if k == "metrics" else 0 for k, p in self.items)
            self.dropped += left
            unsent = len(self.items)
            self.items.clear()
        if unsent:
            log.warning(f"MLflow {self.display_uri} unreachable at the end: {unsent} queued calls not sent; "
                        f"{self.dropped} metric values dropped in all (every logged step is in metrics.jsonl)")
        elif self.dropped:
            log.warning(f"MLflow: {self.dropped} metric values were dropped while the server was out (queue full)")

    def _loop(self) -> None:
        wait = RETRY_S[0]
        while True:
            self.wake.wait(timeout=1.0)
            self.wake.clear()
            while self.run_id is not None and self.items:
                try:
                    self._send_next()
                except Exception as err:  # the server is out (or refused the item): wait, then try again
                    self._down(err)
                    if self.closed.is_set():  # the run ends: try every few seconds until close() gives up
                        time.sleep(min(wait, 2.0))
                    else:
                        self.closed.wait(wait)
                    wait = min(wait * 2, RETRY_S[1])
                    continue
                wait = RETRY_S[0]
                self._up()
            if self.closed.is_set() and not self.items:
                return

    def _send_next(self) -> None:
        """The oldest item; consecutive metric items go as one batch (log_batch takes up to 1000)."""
        with self.lock:
            kind, payload = self.items[0]
            count = 1
            if kind == "metrics":
                batch = list(payload)
                while count < len(self.items) and self.items[count][0] == "metrics" and \
                        len(batch) + len(self.items[count][1]) <= 1000:
                    batch += self.items[count][1]
                    count += 1
                payload = batch
        self._send_one(kind, payload)
        with self.lock:
            for _ in range(count):
                self.items.popleft()

    def _send_one(self, kind: str, payload) -> None:
        from mlflow.entities import Param, RunTag

        c, run = self.client, self.run_id
        if kind == "metrics":
            c.log_batch(run, metrics=payload)
        elif kind == "params":  # params are immutable once logged: only the new ones
            existing = c.get_run(run).data.params
            new = [Param(k, v) for k, v in payload.items() if k not in existing]
            for start in range(0, len(new), 100):
                c.log_batch(run, params=new[start : start + 100])
        elif kind == "tags":
            c.log_batch(run, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "artifact":
            c.log_artifact(run, payload[0], artifact_path=payload[1])
        elif kind == "artifacts":
            c.log_artifacts(run, payload[0], artifact_path=payload[1])
        elif kind == "status":
            c.update_run(run, status=payload["status"])
        elif kind == "terminated":
            c.set_terminated(run, status=payload["status"])

    def _down(self, err: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(f"MLflow {self.display_uri} unreachable ({type(err).__name__}); training goes on, "
                        f"{len(self.items)} calls queued until it answers")

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning(f"MLflow {self.display_uri} reachable again after {time.monotonic() - self.down_since:.0f} s; "
                        "sending what was queued")
            self.down_since = None


def create_run(client, cfg: TrackingConfig, run_dir: str | Path) -> str:
    """A new MLflow run for this training run (its experiment created when needed)."""
    return client.create_run(_experiment_id(client, cfg.experiment), run_name=cfg.run_name or Path(run_dir).name,
                             tags=_parent_tag(cfg)).info.run_id


def driver_run_id(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """The Ray driver's choice of MLflow run for every attempt of this training run: the one the run directory
    records (mlflow_run.json), else a new one. Only for tracking servers: a SQLite store under run_dir is the
    workers' own."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, run_dir)
    if cfg.run_id or not uri.startswith(("http://", "https://")):
        return cfg.run_id
    id_file = Path(run_dir) / RUN_FILE
    if id_file.is_file():
        return json.loads(id_file.read_text())["run_id"]
    _bounded_http_retries()
    run_id = create_run(MlflowClient(uri), cfg, run_dir)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    write_run_file(id_file, run_id, uri)
    return run_id


def write_run_file(path: Path, run_id: str, uri: str) -> None:
    """RUN_FILE: the MLflow run of this training run and its server, the URI stored redacted."""
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": redact_uri(uri)}))


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
