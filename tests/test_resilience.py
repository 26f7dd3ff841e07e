"""The small parts that make failures survivable, each on its own: which checkpoint counts as written, ranks that
wait or stop together over a failing data stream, and MLflow calls that outlive a server outage. The end-to-end
runs with real services are in tests/test_cluster.py."""

from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from expblip.train import checkpoint


def _tag_dir(run_dir, step: int, complete: bool):
    path = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "world_size": 3}))
    return path


def test_the_newest_complete_checkpoint_counts_whatever_latest_says(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    _tag_dir(tmp_path, 4, complete=True)
    _tag_dir(tmp_path, 8, complete=True)
    _tag_dir(tmp_path, 12, complete=False)  # killed while writing
    root = checkpoint.checkpoint_root(tmp_path)
    (root / "latest").write_text("step00000004")  # killed between complete.json and latest
    assert checkpoint.latest_tag(tmp_path) == "step00000008"
    assert checkpoint.written_world_size(tmp_path, "step00000008") == 3  # from complete.json
    checkpoint.prune(tmp_path, keep=1, step=16)  # the older complete one and the stale partial one go
    assert sorted(p.name for p in root.glob("step*")) == ["step00000008"]
    _tag_dir(tmp_path, 20, complete=False)  # a partial one ahead of the run (a killed attempt's) is left for later
    checkpoint.prune(tmp_path, keep=1, step=16)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000008", "step00000020"]


def test_checkpoints_of_older_versions_count_through_latest(tmp_path):
    old = _tag_dir(tmp_path, 6, complete=False)
    (old / "rank0.pt").write_bytes(b"x")
    (old / "rank1.pt").write_bytes(b"x")
    (checkpoint.checkpoint_root(tmp_path) / "latest").write_text("step00000006")
    assert checkpoint.latest_tag(tmp_path) == "step00000006"
    assert checkpoint.written_world_size(tmp_path, "step00000006") == 2


# ---------------------------------------------------------------- ranks agree over the data stream


class _Run:
    """What loop.next_batch reads of a Run."""

    def __init__(self, rank: int, world: int, batches) -> None:
        self.rank, self.world, self.step, self.batches = rank, world, 0, batches


def _agree(rank: int, world: int, port: int, plan: dict, out) -> None:
    from expblip.data.stream import StreamError
    from expblip.train.loop import next_batch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def batches():
        for item in plan[rank]:
            if item == "slow":  # storage out for a while, then back: the other rank waits for this one
                time.sleep(2.0)
                yield {"keys": [f"late{rank}"]}
            elif item == "fail":
                raise StreamError("storage unreachable for 5 s")
            else:
                yield {"keys": [item]}

    run, got = _Run(rank, world, batches()), []
    try:
        for _ in range(len(plan[rank])):
            got.append(next_batch(run)["keys"][0])
            run.step += 1
    except StreamError as exn:
        got.append(f"raised: {exn}")
    out.put((rank, got))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import the training loop (~25 s on a busy 2-core machine)
def test_ranks_wait_for_a_slow_stream_and_stop_together_when_one_fails():
    from conftest import _free_port

    plan = {0: ["a0", "slow", "c0", "fail"], 1: ["a1", "b1", "c1", "d1"]}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_agree, args=(r, 2, port, plan, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0][:3] == ["a0", "late0", "c0"] and results[1][:3] == ["a1", "b1", "c1"]
    for rank in (0, 1):  # rank 1 had its batch, yet stops with rank 0, naming rank 0's error
        assert len(results[rank]) == 4 and results[rank][3].startswith("raised: the data stream failed at step 4")
        assert "rank 0: StreamError: storage unreachable for 5 s" in results[rank][3]


# ---------------------------------------------------------------- MLflow calls that outlive an outage


class _FlakyClient:
    """An MlflowClient stand-in whose server is out for the first ``down`` calls."""

    def __init__(self, down: int) -> None:
        self.down, self.calls, self.metrics, self.tags, self.status = down, 0, [], {}, None

    def _call(self) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise ConnectionError("connection refused")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._call()
        self.metrics += [(m.key, m.step, m.value) for m in metrics]
        self.tags.update({t.key: t.value for t in tags})

    def set_terminated(self, run_id, status):
        self._call()
        self.status = status


def test_the_outbox_keeps_calls_in_order_through_an_outage_and_sends_them_after(monkeypatch):
    from mlflow.entities import Metric

    from expblip.train import tracking

    monkeypatch.setattr(tracking, "RETRY_S", (0.01, 0.05))
    client = _FlakyClient(down=5)
    box = tracking.Outbox(client, "http://mlflow")
    box.run_id = "r"
    for step in range(1, 11):  # the loop goes on: put() never waits for the server
        box.put("metrics", [Metric("loss", float(step), 0, step)])
    box.put("tags", {"world_size": "1"})
    box.put("terminated", {"status": "FINISHED"})
    box.close(timeout_s=30)
    assert [s for _, s, _ in client.metrics] == list(range(1, 11)) and client.tags == {"world_size": "1"}
    assert client.status == "FINISHED" and box.dropped == 0
    assert client.calls <= 5 + 3  # the queued metrics went out as one batch


def test_the_outbox_drops_the_oldest_metrics_past_its_limit_and_counts_what_it_could_not_send(monkeypatch):
    from mlflow.entities import Metric

    from expblip.train import tracking

    monkeypatch.setattr(tracking, "MAX_QUEUED", 4)
    monkeypatch.setattr(tracking, "RETRY_S", (0.01, 0.05))
    box = tracking.Outbox(_FlakyClient(down=10**9), "http://mlflow")  # never comes back
    box.run_id = "r"
    for step in range(6):
        box.put("metrics", [Metric("loss", 1.0, 0, step)])
    box.put("tags", {"a": "b"})
    assert box.dropped == 2 and [p[0].step for k, p in box.items if k == "metrics"] == [2, 3, 4, 5]
    box.close(timeout_s=0.2)
    assert box.dropped == 6 and not box.items
