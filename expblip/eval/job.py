"""An evaluation as ``launch/evaluate.py`` asks for it: captions and baselines, optional probes, the report files,
MLflow, and the printed tables. The script only parses arguments into an ``EvalJob`` and calls ``run_job``.

    job = EvalJob(model="runs/stage2", shards="demo/shards/test", train_shards="demo/shards/train", out="runs/e")
    result = run_job(job)          # prints the tables and ends with the verdict lines

Nothing here imports Ray or DeepSpeed; MLflow is imported only when ``job.mlflow`` is set.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class EvalJob:
    """One evaluation: what to caption, what to compare with, where the results go."""

    model: str  # export directory, or a run directory holding export/
    shards: str  # held-out shards
    train_shards: str = ""  # what the baselines are chosen on ('' = the held-out text: optimistic)
    out: str = ""  # directory for metrics.json, report.md and the plots ('' = none)
    limit: int | None = None  # a quick look: a seeded random N of the held-out samples (refused with protocol)
    aus: str = ""  # DATASET_AUS key to score; '' = the held-out shards' dataset (expblip.eval.provenance)
    beams: int = 5
    max_new_tokens: int = 60
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "fp32"  # bf16 | fp16 | fp32: the model's weights and compute
    progress: bool = True
    caption_metrics: bool = True
    meteor: bool = True
    probe: Sequence[str] = field(default_factory=list)  # "vit", "qformer"
    probe_train_shards: str = ""
    probe_task: str = "both"  # "au", "emotion" or "both"
    probe_pooling: str = "mean"
    probe_limit: int | None = None  # the probes train on the first N training samples (the test split is whole)
    mlflow: bool = False  # into the training run of `model` when it recorded one, else a new run at mlflow_uri
    mlflow_uri: str = ""
    mlflow_experiment: str = "expblip-eval"
    protocol: str = ""  # "bp4d-3fold" | "disfa-3fold": one export per fold, {fold} in the paths (expblip.eval.protocol)
    task: str = ""  # one of the export's tasks (describe, aus, emotion); '' = every task it was trained on

    def __post_init__(self) -> None:
        if self.probe and not self.probe_train_shards:
            raise ValueError("--probe needs --probe-train-shards (the shards the linear layer trains on)")


def evaluate(job: EvalJob) -> dict:
    """The evaluation (and probes) that the job asks for."""
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.evaluate import evaluate_tasks, training_text
    from expblip.eval.probe import run_probes
    from expblip.eval.provenance import resolve_aus
    from expblip.infer.captioner import resolve_export
    from expblip.model.generation import GenerationConfig

    export = resolve_export(job.model)  # the path only: a missing model is named first
    aus_key, aus_source = resolve_aus(job.aus, job.shards)  # before the model loads: a contradiction fails fast
    aus = DATASET_AUS[aus_key]
    gen = GenerationConfig(num_beams=job.beams, max_new_tokens=job.max_new_tokens)
    train = training_text(job.train_shards) if job.train_shards else None
    results = evaluate_tasks(export, job.shards, [job.task] if job.task else None, job.device, job.dtype, aus=aus,
                             gen=gen, limit=job.limit, train=train, batch_size=job.batch_size, progress=job.progress,
                             caption_metrics=job.caption_metrics, meteor=job.meteor)
    for one in results.values():
        one["settings"].update(aus_set=aus_key, aus_source=aus_source)
    result = dict(results.get("describe") or next(iter(results.values())))  # the report's and MLflow's
    if len(results) > 1:  # a task-prompted model: every task's scores beside the baselines
        result["tasks"] = results
    tasks = ("au", "emotion") if job.probe_task == "both" else (job.probe_task,)
    probes = [p for features in dict.fromkeys(job.probe)
              for p in run_probes(export, job.probe_train_shards, job.shards, features, tasks, aus, job.probe_pooling,
                                  batch_size=job.batch_size, limit=job.probe_limit, device=job.device, dtype=job.dtype,
                                  progress=job.progress, skip_unlabelled=True)]
    if probes:
        result["probes"] = probes
    return result


def log_mlflow(job: EvalJob, result: dict, out: str) -> str:
    """Into the training run of ``job.model`` when it recorded one, else a new run at ``job.mlflow_uri``."""
    from expblip.eval.report import find_mlflow_run, log_to_mlflow

    target = find_mlflow_run(job.model)
    if target:
        return log_to_mlflow(result, out, target["tracking_uri"], target["run_id"])
    uri = job.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"{job.model} has no mlflow_run.json (not a training run directory); pass --mlflow-uri "
                         "or set MLFLOW_TRACKING_URI for a new evaluation run")
    return log_to_mlflow(result, out, uri, experiment=job.mlflow_experiment)


def report(job: EvalJob, result: dict) -> list[str]:
    """Files and MLflow; returns the lines to print (the tables, then the verdict lines last)."""
    from expblip.eval.report import (
        au_table,
        baseline_table,
        caption_table,
        header_notes,
        probe_table,
        summary_lines,
        write_report,
    )

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="expblip-eval-") as scratch:
        out = job.out or scratch  # MLflow needs the files even without --out
        if job.out or job.mlflow:
            path = write_report(result, out)
            if job.out:
                lines.append(f"report: {path / 'report.md'}")
        if job.mlflow:
            lines.append(f"mlflow run: {log_mlflow(job, result, out)}")
    lines += [line for note in header_notes(result) for line in (note, "")]
    lines += [baseline_table(result), "", au_table(result)]
    if result.get("tasks"):
        from expblip.eval.report import task_table

        lines += ["", task_table(result["tasks"])]
    if result.get("captions"):
        lines += ["", caption_table(result)]
    if result.get("probes"):
        lines += ["", probe_table(result["probes"])]
    if result.get("tasks"):
        verdicts = [f"{task}: {line}" for task, res in result["tasks"].items() for line in summary_lines(res)]
        return [*lines, "", *verdicts]
    return [*lines, "", *summary_lines(result)]


def run_job(job: EvalJob) -> dict:
    """Evaluate, write, log, and print the tables and verdict lines; returns the result (with ``job.protocol``:
    every fold, expblip.eval.protocol, and the protocol's summary)."""
    if job.protocol:
        from expblip.eval.protocol import run_protocol

        return run_protocol(job)
    result = evaluate(job)
    print("\n".join(report(job, result)), flush=True)
    return result
