"""make_shards --ray ADDRESS (issue 22): the conversion's reading, checking, resizing and encoding run as Ray tasks on
a cluster of two nodes on this machine, and the shards, manifest, skip counts and examples are those of one local
process, byte for byte. The table is tests/test_convert_workers.py's: missing, truncated, unlabelled and duplicate
rows among JPEG, PNG and BMP faces."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_launcher
from test_convert_workers import files, table  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node, 1 CPU each (tasks land on both)."""
    from services import ray_cluster

    found = ray_cluster(tmp_path_factory.mktemp("ray"), nodes=2, env={"PYTHONPATH": str(REPO)})
    yield found
    found.stop()


BAR = re.compile(r"^.*\d+(\.\d+)?(sample/s|s/sample)\]")  # tqdm's "... 73sample [00:02, 35.38sample/s]"


def make_shards(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return run_launcher([sys.executable, "launch/make_shards.py", *args], env=env, timeout=300)


def test_a_conversion_on_two_ray_nodes_writes_the_local_bytes_and_counts(table, cluster, tmp_path):  # noqa: F811
    common = ["table", "--table", str(table), "--resize", "12", "--samples-per-shard", "13", "--max-skipped", "0.5"]
    local = make_shards([*common, "--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr[-3000:]
    on_ray = make_shards([*common, "--out", str(tmp_path / "ray"), "--ray", cluster.address], env=cluster.client_env())
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert files(tmp_path / "ray") == files(tmp_path / "local")  # every shard and the manifest
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["total_samples"] == 91 - 17 and len(manifest["shards"]) == 6
    # the same skip counts and examples, reported the same way
    def report(proc, out):  # a progress bar drawn on stderr may precede a line (timing): its text is cut off
        lines = [BAR.sub("", line) for line in proc.stdout.splitlines() + proc.stderr.splitlines()]
        return [line.replace(str(tmp_path / out), "OUT") for line in lines
                if "skipped" in line or "example" in line or "samples in" in line]
    assert report(on_ray, "ray") == report(local, "local")
    assert any("unreadable image" in line for line in report(local, "local"))
    # and the encoding did run as Ray tasks on the cluster, one per chunk of 16 rows (which node takes each is Ray's
    # choice: SPREAD is best effort, and seen here both ways)
    tasks = [t for t in cluster.get("/api/v0/tasks?limit=1000&detail=1")["data"]["result"]["result"]
             if t["name"].endswith("encode_chunk") and t["state"] == "FINISHED"]
    nodes = {n["raylet"]["nodeId"] for n in cluster.get("/nodes?view=summary")["data"]["summary"]}
    assert len(tasks) == -(-91 // 16) and {t["node_id"] for t in tasks} <= nodes, tasks[:2]


def test_ray_and_workers_together_are_refused(table, tmp_path):  # noqa: F811
    proc = make_shards(["table", "--table", str(table), "--out", str(tmp_path / "x"), "--ray", "auto",
                        "--workers", "2"])
    assert proc.returncode == 2 and "--ray" in proc.stderr and "--workers" in proc.stderr
    assert not (tmp_path / "x").exists()
