"""The spine under DeepSpeed ZeRO-3 on 2 CPU ranks: learning, freezing, exact resume, MLflow, both launchers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_collectives_suit_nccl, audit_env, deepspeed_cmd, read_metrics, run_launcher

from expblip.model.weights import read_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def init_export(tiny_shards, tmp_path_factory) -> Path:
    """Random tiny BLIP-2 + a tokenizer trained on the shards' captions, exported as the initial weights."""
    from expblip.data.stream import StreamConfig, iterate_once
    from expblip.model.blip2 import ModelConfig, build_model
    from expblip.model.tokenizer import train_caption_tokenizer
    from expblip.model.weights import export_hf

    captions = [c for b in iterate_once(StreamConfig(shards=str(tiny_shards["train"]))) for c in b["captions"]]
    tok = train_caption_tokenizer(captions, vocab_size=256)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), tok)
    return export_hf(model.state_dict(), model.config, tok, tmp_path_factory.mktemp("init") / "export")


@pytest.fixture(scope="module")
def uneven_eval(tmp_path_factory) -> Path:
    """40 held-out faces in shards of 16, 16 and 8: the two ranks' shares differ (32 vs 8 samples), so the
    evaluation must pad the smaller share or one rank would wait alone in a collective."""
    from expblip.data.shards import write_shards
    from expblip.data.synthetic import synthetic_records

    out = tmp_path_factory.mktemp("eval") / "val"
    write_shards(synthetic_records(40, seed=5, split="val"), str(out), samples_per_shard=16, progress=False,
                 meta={"source": "synthetic", "split": "val"})
    return out


def common(tiny_shards, init_export, uneven_eval) -> list[str]:
    return [f"data.train.shards={tiny_shards['train']}", "data.train.batch_size=8", f"model.weights={init_export}",
            "model.dropout=0.0", "model.freeze_lm=false", "optim.lr=3e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2", "train.max_steps=24",
            "train.log_every=1", "train.ckpt_every=12", "tracking.experiment=spine",
            "tracking.system_metrics_every_s=1", f"data.eval.shards={uneven_eval}", "data.eval.batch_size=8",
            "train.eval_every=12", "train.eval_batches=3", "train.eval_generate=12", "train.eval_max_new_tokens=8"]


@pytest.fixture(scope="module")
def s3_shards(tiny_shards, s3_server) -> str:
    """The same training shards, uploaded to the local SeaweedFS S3 server: runs that read them must see the same
    data in the same order as the runs that read the local copy (their losses are compared below)."""
    client = s3_server.client()
    client.create_bucket(Bucket="spine")
    for f in sorted(tiny_shards["train"].iterdir()):
        client.upload_file(str(f), "spine", f"train/{f.name}")
    return "s3://spine/train"


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="module")
def stale_extension_lock(tmp_path_factory) -> Path:
    """A torch-extensions dir where a build of DeepSpeed's CPU shm all-reduce op was killed: its lock stays forever."""
    root = tmp_path_factory.mktemp("torch_extensions")
    (root / "deepspeed_shm_comm").mkdir()
    (root / "deepspeed_shm_comm" / "lock").touch()
    return root


@pytest.fixture(scope="module")
def shm_before() -> set[Path]:
    return set(Path("/dev/shm").glob(SHM_BUFFERS))


@pytest.fixture(scope="module")
def full_run(tiny_shards, init_export, uneven_eval, tmp_path_factory, stale_extension_lock, shm_before) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *common(tiny_shards, init_export, uneven_eval),
                                      f"train.run_dir={run_dir}"),
                        env={"TORCH_EXTENSIONS_DIR": str(stale_extension_lock), **audit_env(run_dir / "audit")},
                        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_the_loops_collectives_would_run_on_a_gpu_nodes_nccl_group(full_run):
    """The 2-rank run above ran under the collective audit (tests/audit): every collective of the loop, the held-out
    evaluation and the checkpoints either takes a CUDA tensor on the default group or goes through the gloo host
    group, as NCCL requires (a CPU tensor on NCCL raises "No backend type associated with device type cpu")."""
    records = assert_collectives_suit_nccl(full_run / "audit", {"expblip.train.loop", "expblip.train.heldout",
                                                                "expblip.train.checkpoint"})
    assert {r["op"] for r in records} >= {"all_reduce", "all_gather_object", "broadcast_object_list", "barrier"}


def test_cpu_training_builds_no_shm_op_and_leaves_no_shm_buffers(full_run, stale_extension_lock, shm_before):
    # the run finished although a killed build's lock sits where DeepSpeed would JIT-build its CPU shm all-reduce
    assert (stale_extension_lock / "deepspeed_shm_comm" / "lock").exists()
    assert not list((stale_extension_lock / "deepspeed_shm_comm").glob("*.so"))
    assert set(Path("/dev/shm").glob(SHM_BUFFERS)) <= shm_before  # no 66 MiB /dev/shm buffer per rank left behind


def test_heldout_evaluation_every_12_steps_on_both_ranks_with_the_best_step(full_run):
    import mlflow

    lines = {m["step"]: m for m in read_metrics(full_run)}
    evaluated = sorted(step for step, m in lines.items() if "eval/loss" in m)
    assert evaluated == [12, 24]  # train.eval_every=12, and the last step
    first, last = lines[12], lines[24]
    assert last["eval/loss"] < first["eval/loss"]  # the held-out loss falls as the training loss does
    assert last["eval/best_step"] == 24 and last["eval/best_loss"] == last["eval/loss"]
    for m in (first, last):  # 6 captions from each rank, scored by the strict evaluator beside the best constants
        assert m["eval/captions"] == 12 and {"eval/mean_au_f1", "eval/emotion_accuracy"} <= set(m)
        assert m["eval/best_baseline.mean_au_f1"] > 0.1  # every AU of the training labels, named at once
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{full_run / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("spine").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [12, 24]
    assert run.data.tags["eval.best_step"] == "24"
    assert run.data.tags["eval.split"] == "val" and run.data.tags["train.keep"] == "last"  # selected on validation
    selection = json.loads((full_run / "export" / "expblip.json").read_text())["selection"]
    assert selection["split"] == "val" and selection["best_step"] == 24 and selection["keep"] == "last"


def test_loss_falls_frozen_towers_identical_trainable_changed(full_run, init_export):
    losses = [m["loss"] for m in read_metrics(full_run)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    before, after = read_state(init_export), read_state(full_run / "export")
    # a random OPT trains here (freeze_lm=false) so the loss moves within 24 steps; the ViT stays frozen
    frozen = [k for k in before if k.startswith("vision_model.")]
    trained = [k for k in before if k.startswith(("qformer.", "query_tokens", "language_projection.", "language_model."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical after ZeRO-3 partitioning
    changed = [k for k in trained if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.8 * len(trained)


def test_stopped_run_resumes_at_next_step_with_same_trajectory(full_run, tiny_shards, init_export, uneven_eval,
                                                               tmp_path, s3_shards, s3_server):
    # this run reads its shards from s3:// through the deepspeed launcher; the reference read the local copy
    args = [*common(tiny_shards, init_export, uneven_eval), f"train.run_dir={tmp_path}", f"data.train.shards={s3_shards}"]
    first = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args, "train.stop_after=12"),
                         env=s3_server.env())
    assert first.returncode == 0, first.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))
    second = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args), env=s3_server.env())
    assert second.returncode == 0, second.stderr[-3000:]
    assert "start step 12" in second.stdout
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == list(range(1, 25))  # continues at 13, nothing repeated
    reference = read_metrics(full_run)
    for got, want in zip(resumed, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), (got["step"], got, want)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)
    a, b = read_state(tmp_path / "export"), read_state(full_run / "export")
    # the loss trajectories above agree to 1e-4; Adam turns float-level differences of the gloo all-reduce order into
    # small weight differences, so the final weights are compared with a matching tolerance
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst < 2e-2, worst  # measured 5.6e-3 after 24 steps at lr 3e-3


def test_mlflow_run_holds_params_and_per_step_metrics(full_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{full_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("spine").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.stage"] == "stage2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))
    for name in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "data.skipped.total"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 24, name
    tokens = client.get_metric_history(run.info.run_id, "tokens_per_s")
    samples = client.get_metric_history(run.info.run_id, "samples_per_s")
    # every caption is padded/queried to more than 8 tokens, so tokens/s exceeds samples/s several times over
    assert all(t.value > 8 * s.value for t, s in zip(tokens, samples, strict=True))
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    tags = run.data.tags
    assert tags["stage"] == "stage2" and tags["preset"] == "tiny" and tags["world_size"] == "2"
    head = run_launcher(["git", "rev-parse", "HEAD"]).stdout.strip() or "unknown"
    assert tags["recipe"] == "(none)" and tags["git_commit"].startswith(head)
    assert run.info.status == "FINISHED"
    assert {"config.yaml", "ds_config.json", "export"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # the trainable-only export (tracking.log_export default): trained tensors + fingerprints of the frozen towers
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/trainable.safetensors", "export/expblip.json", "export/config.yaml"} <= exported, exported


def test_ray_train_path_gives_the_same_first_losses(full_run, tiny_shards, init_export, uneven_eval, tmp_path,
                                                    s3_shards, s3_server):
    # Ray workers read the shards from s3:// (credentials reach them from the driver's AWS_* environment)
    proc = run_launcher([sys.executable, "launch/pretrain.py", *common(tiny_shards, init_export, uneven_eval),
                         f"data.train.shards={s3_shards}", f"train.run_dir={tmp_path}", "train.stop_after=3",
                         "ray.num_workers=2"], env={**s3_server.env(), **audit_env(tmp_path / "audit")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Ray's workers bind their device and exchange through the host group too (ray_job: the placement gather)
    assert_collectives_suit_nccl(tmp_path / "audit", {"expblip.train.ray_job", "expblip.train.loop"})
    ray_losses = [m["loss"] for m in read_metrics(tmp_path)]
    ds_losses = [m["loss"] for m in read_metrics(full_run)][:3]
    assert ray_losses == pytest.approx(ds_losses, rel=1e-4)


def test_stage1_two_ranks_each_loss_falls_and_the_checkpoint_exports_its_blip2(tiny_shards, tmp_path):
    from expblip.train.export import export_checkpoint

    run = tmp_path / "run"
    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", f"data.train.shards={tiny_shards['train']}",
                                      "train.stage=stage1", "data.train.batch_size=16", "optim.lr=2e-3",
                                      "optim.warmup_steps=2", "train.max_steps=20", "train.log_every=1",
                                      "train.ckpt_every=20", f"train.run_dir={run}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(run)
    for part in ("loss_itc", "loss_itm", "loss_itg"):
        values = [m[part] for m in metrics]
        assert sum(values[-4:]) / 4 < 0.9 * sum(values[:4]) / 4, (part, values)
    assert (run / "export" / "qformer_tokenizer" / "tokenizer.json").is_file()

    # Stage 1 trains the Q-Former's text side and ITC/ITM/ITG heads beside the HF model: the checkpoint's export keeps
    # the HF model (Q-Former with its text feed-forwards) as the loop's own export does, and names the heads it leaves.
    result = export_checkpoint(run, tmp_path / "export")
    ours, trainers = read_state(tmp_path / "export"), read_state(run / "export")
    assert sorted(ours) == sorted(trainers) and all(torch.equal(ours[k], trainers[k]) for k in ours)
    assert any(".intermediate." in k for k in ours)  # the Q-Former's text side travels with it
    assert {"itm_head.weight", "vision_proj.weight", "text_proj.weight"} <= set(result.heads)
    meta = json.loads((tmp_path / "export" / "expblip.json").read_text())
    assert meta["source"]["stage"] == "stage1" and meta["source"]["heads_not_exported"] == result.heads
    assert (tmp_path / "export" / "qformer_tokenizer" / "tokenizer.json").is_file()


def test_keep_best_exports_the_step_selected_on_validation_and_keeps_its_checkpoint(tiny_shards, init_export,
                                                                                    uneven_eval, tmp_path):
    """train.keep=best: a learning rate that overshoots makes the held-out loss best before the last step; that
    step is checkpointed when found, its checkpoint outlives pruning (keep_checkpoints=1), and the export holds its
    weights: the digest restored for the export is the one saved at that step, not the last step's."""
    import re

    run_dir = tmp_path / "best"
    args = [*common(tiny_shards, init_export, uneven_eval), "train.max_steps=8", "train.ckpt_every=0",
            "train.eval_every=2", "train.eval_generate=0", "train.keep_checkpoints=1", "train.keep=best",
            "optim.lr=0.3", "optim.min_lr=0.3", "optim.warmup_steps=0", f"train.run_dir={run_dir}"]
    proc = run_launcher(deepspeed_cmd("--deepspeed", "ds_configs/zero3.json", *args, ranks=1), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    evals = {m["step"]: m["eval/loss"] for m in read_metrics(run_dir) if "eval/loss" in m}
    best = min(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6, 8] and best < 8, evals  # the precondition: the best step is not the last
    saved = dict(re.findall(r"trainable weights saved at step (\d+): sha256 (\w+)", out))
    restored = re.findall(rf"trainable weights of step {best} restored for the export at step 8: sha256 (\w+)", out)
    assert restored == [saved[str(best)]] and saved["8"] != saved[str(best)], (saved, restored)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == [f"step{best:08d}", "step00000008"]
    meta = json.loads((run_dir / "export" / "expblip.json").read_text())
    assert meta["step"] == best and meta["selection"]["keep"] == "best" and meta["selection"]["split"] == "val"
