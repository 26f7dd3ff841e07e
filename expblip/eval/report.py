"""Evaluation reports: metrics.json, report.md and PNG plots in one directory, and their MLflow logging.

    out = write_report(result, "runs/stage2/eval")     # metrics.json, report.md, au_f1.png, emotion_confusion.png
    log_to_mlflow(result, out, **find_mlflow_run("runs/stage2"))   # into the training run (DESIGN.md data flow)

``result`` is what ``expblip.eval.evaluate.evaluate_export`` returns, optionally with "captions" (caption text
scores) and "probes" (a list of ``expblip.eval.probe`` results); every section of the report appears only when its
part is present. Plots use matplotlib's Agg canvas through the object API (no pyplot, no display, no global backend).
MLflow is imported only by ``log_to_mlflow``: evaluation without tracking never loads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from expblip.credentials import unredact_uri
from expblip.eval.caption_metrics import BEST_METRICS, COCO_METRICS, NOT_COMPARABLE, tokenizer_fallback

MLFLOW_RUN_FILE = "mlflow_run.json"  # written into the run directory by expblip.train.tracking
ARTIFACT_DIR = "eval"  # artefact folder of the report inside the MLflow run
METRIC_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- Markdown tables


def _baselines(result: dict) -> list[dict]:
    return result.get("baselines") or []


def au_table(result: dict) -> str:
    """Markdown table of per-AU F1: the model and every baseline, with the means as the last row."""
    model, bases = result["model"], [b for b in _baselines(result) if b.get("per_au_f1")]
    rows = ["| AU | model | " + " | ".join(_cell(b["name"]) for b in bases) + " |",
            "|---:|---:|" + "---:|" * len(bases)]
    for au in sorted(model["per_au_f1"], key=int):
        cells = [_fmt(b["per_au_f1"].get(au, b["per_au_f1"].get(str(au)))) for b in bases]
        rows.append(f"| {au} | {_fmt(model['per_au_f1'][au])} | " + " | ".join(cells) + " |")
    rows.append(f"| **mean** | **{_fmt(model['mean_au_f1'])}** | "
                + " | ".join(f"**{_fmt(b['mean_au_f1'])}**" for b in bases) + " |")
    return "\n".join(rows)


def baseline_table(result: dict) -> str:
    """Markdown table: the model and each baseline on both label metrics, with the constant captions spelled out."""
    model = result["model"]
    rows = ["| predictor | mean AU F1 | emotion accuracy | caption |", "|---|---:|---:|---|",
            f"| **model** | **{_fmt(model['mean_au_f1'])}** | **{_fmt(model['emotion_accuracy'])}** | (generated) |"]
    for b in _baselines(result):
        caption = f'"{_cell(b["caption"])}"' if b["caption"] else "(no caption: random labels)"
        rows.append(f"| {_cell(b['name'])} | {_fmt(b['mean_au_f1'])} | {_fmt(b['emotion_accuracy'])} | {caption} |")
    return "\n".join(rows)


def _verdict(result: dict, metric: str, label: str) -> str | None:
    value, best = result["model"].get(metric), (result.get("best") or {}).get(metric)
    if value is None or best is None:
        return None
    against = "best constant caption" if best["constant"] else best["name"]
    return f"held-out {label}: {_fmt(value)} ({against}: {_fmt(best['score'])})"


def task_table(results: dict[str, dict]) -> str:
    """Markdown table: each task asked with its prompt, its metrics, and the strongest baseline of each metric."""
    rows = ["| task | prompt | mean AU F1 | emotion accuracy | strongest baseline: AU F1 | emotion accuracy |",
            "|---|---|---:|---:|---:|---:|"]
    for task, result in results.items():
        model, best = result["model"], result.get("best") or {}
        base = [_fmt((best.get(m) or {}).get("score")) for m in ("mean_au_f1", "emotion_accuracy")]
        prompt = result["settings"].get("prompt") or "(none)"
        rows.append(f"| {task} | {_cell(prompt)} | {_fmt(model['mean_au_f1'])} | {_fmt(model['emotion_accuracy'])} "
                    f"| {base[0]} | {base[1]} |")
    return "\n".join(rows)


def header_notes(result: dict) -> list[str]:
    """What a reader must know before any number: a held-out subset instead of the whole split, where the scored
    AU set came from, and a caption tokeniser that is not the COCO one."""
    settings, notes = result.get("settings", {}), []
    subset = settings.get("subset")
    if subset:
        notes.append(f"**Quick look, not the whole test split:** a seeded random {subset['samples']} of the "
                     f"{subset['of']} held-out samples (seed {subset['seed']}), drawn across the split (--limit); "
                     "not comparable with numbers on the whole split.")
    if settings.get("aus_set"):
        notes.append(f"AUs scored: {settings['aus_set']} ({settings.get('aus_source', '?')}).")
    fallback = tokenizer_fallback((result.get("captions") or {}).get("model") or {})
    if fallback:
        notes.append(f"**Caption tokenisation: the regex fallback** ({fallback}), {NOT_COMPARABLE} (PTB, run by "
                     "Java): its BLEU, ROUGE-L and CIDEr differ from published ones; install a JRE to compare.")
    return notes


def summary_lines(result: dict) -> list[str]:
    """The verdict lines, each learned score beside the strongest baseline: emotion accuracy (when scored), then
    mean AU F1 (when scored) last, e.g. ``held-out mean AU F1: 0.861 (best constant caption: 0.412)``."""
    lines = [_verdict(result, "emotion_accuracy", "emotion accuracy"), _verdict(result, "mean_au_f1", "mean AU F1")]
    return [line for line in lines if line]


def summary_line(result: dict) -> str:
    """The last verdict line (mean AU F1 when AUs are scored)."""
    lines = summary_lines(result)
    return lines[-1] if lines else "held-out: nothing scored (no AU or emotion labels in the shards)"


def caption_table(result: dict) -> str:
    """Markdown table of the caption text scores, model vs the most frequent training caption."""
    scores = result["captions"]
    model, base = scores["model"], scores.get("baseline", {})
    rows = ["| metric | model | most frequent training caption |", "|---|---:|---:|"]
    for name in (*COCO_METRICS, *BEST_METRICS):
        rows.append(f"| {name} | {_fmt(model.get(name))} | {_fmt(base.get(name))} |")
    notes = [f"Fractions (the paper prints the embedding similarity in per cent); {model['images']} images, "
             f"{model['references']} references; tokenizer: {model['tokenizer']}"]
    notes += [f"{metric} skipped: {why}" for metric, why in model.get("skipped", {}).items()]
    if model.get("embedding_model"):
        notes.append(f"embedding model: {model['embedding_model']}")
    return "\n".join(rows) + "\n\n" + "; ".join(notes) + "."


def emotion_table(confusion: dict) -> str:
    """The confusion matrix as Markdown: rows the true emotion, columns what the caption named (an emotion alone,
    several, none)."""
    columns = confusion.get("columns") or [*confusion["classes"], "none"]  # results written before "several"
    rows = ["| true \\ named | " + " | ".join(columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, counts in zip(confusion["classes"], confusion["matrix"], strict=True):
        rows.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(rows)


def probe_table(probes: Sequence[dict]) -> str:
    """One row per linear probe: features, pooling, task, probe score, baseline and chance."""
    rows = ["| features | pooling | task | metric | probe | baseline | chance | train / test samples |",
            "|---|---|---|---|---:|---:|---:|---|"]
    for p in probes:
        if "skipped_reason" in p:
            rows.append(f"| {p['features']} | {p['pooling']} | {p['task']} | skipped: {_cell(p['skipped_reason'])} "
                        "| | | | |")
            continue
        rows.append(f"| {p['features']} | {p['pooling']} | {p['task']} | {p['metric']} | {_fmt(p['score'])} "
                    f"| {_fmt(p['baseline']['score'])} ({_cell(p['baseline']['name'])}) | {_fmt(p.get('chance'))} "
                    f"| {p['train_samples']} / {p['test_samples']} |")
    return "\n".join(rows)


def _samples_table(samples: Sequence[dict]) -> list[str]:
    lines = ["## Samples", "", "| key | generated | reference | AUs | emotions |", "|---|---|---|---|---|"]
    for s in samples:
        t = s["truth"]
        lines.append(f"| {s['key']} | {_cell(s['caption'])} | {_cell(t.get('caption', ''))} | {t.get('aus')} "
                     f"| {t.get('emotions')} |")
    return lines


def _label_sections(result: dict, plots: dict[str, str]) -> list[str]:
    model, settings = result["model"], result.get("settings", {})
    lines = [f"Shards: `{settings.get('shards', '?')}`; samples: {model['counts']}.", "",
             "## The model beside every baseline", "",
             "Baselines are chosen on " + str(result.get("baseline_source", "train")) + " text; emotion accuracy "
             "counts a caption right only when the emotions it names equal the true set.", "",
             baseline_table(result), "", "## Action Units (parsed from the captions)", "", au_table(result), ""]
    if "au_f1" in plots:
        lines += [f"![per-AU F1, model vs the best constant caption]({plots['au_f1']})", ""]
    if model.get("emotion_confusion"):
        lines += ["## Emotions", "", "Model confusion (single-emotion samples):", "",
                  emotion_table(model["emotion_confusion"]), ""]
    if "emotion_confusion" in plots:
        lines += [f"![emotion confusion]({plots['emotion_confusion']})", ""]
    return lines


def report_markdown(result: dict, plots: dict[str, str] | None = None) -> str:
    """The whole report; ``plots`` maps plot names ("au_f1", "emotion_confusion") to file names beside it."""
    plots = plots or {}
    settings = result.get("settings", {})
    lines = [f"# Held-out evaluation of {settings.get('export', 'an export')}", ""]
    lines += [line for note in header_notes(result) for line in (note, "")]
    if "model" in result:
        lines += _label_sections(result, plots)
    if result.get("captions"):
        lines += ["## Caption metrics", "", caption_table(result), ""]
    if result.get("probes"):
        lines += ["## Linear probes (one linear layer on frozen features)", "", probe_table(result["probes"]), ""]
    if "model" in result:
        lines += [*summary_lines(result), ""]
    if result.get("samples"):
        lines += _samples_table(result["samples"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _best_au_baseline(result: dict) -> dict | None:
    best = (result.get("best") or {}).get("mean_au_f1")
    return next((b for b in _baselines(result) if best and b["key"] == best["key"]), None)


def plot_au_f1(result: dict, path: str | Path) -> Path:
    """Grouped bars of per-AU F1: model vs the strongest AU baseline, means in the title."""
    import numpy as np

    model, base = result["model"], _best_au_baseline(result) or {"per_au_f1": {}, "mean_au_f1": None, "name": "-"}
    aus = sorted(model["per_au_f1"], key=int)
    x = np.arange(len(aus))
    fig = _figure(max(5.0, 0.6 * len(aus) + 2), 3.6)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [model["per_au_f1"][a] for a in aus], 0.4, label="model", color="#1f77b4")
    ax.bar(x + 0.2, [base["per_au_f1"].get(a, 0.0) for a in aus], 0.4, label=base["name"], color="#bbbbbb")
    ax.set(xticks=x, xticklabels=[f"AU{a}" for a in aus], ylim=(0, 1.2), ylabel="F1",
           title=f"per-AU F1: model {_fmt(model['mean_au_f1'])} vs best baseline {_fmt(base['mean_au_f1'])} (mean)")
    ax.legend(loc="upper center", ncols=2, frameon=False)  # above the bars (F1 <= 1)
    fig.savefig(path, format="png")
    return Path(path)


def plot_confusion(confusion: dict, path: str | Path, title: str = "emotion confusion (model)") -> Path:
    """Heatmap of the confusion counts, coloured by the row fraction, with the counts written in the cells."""
    import numpy as np

    counts = np.asarray(confusion["matrix"], dtype=float)  # [true classes, named columns]
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    columns = confusion.get("columns") or [*confusion["classes"], "none"]
    fig = _figure(1.0 * len(columns) + 2.5, 0.8 * len(confusion["classes"]) + 2)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, int(n), ha="center", va="center", color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(columns)), xticklabels=columns, yticks=range(len(confusion["classes"])),
           yticklabels=confusion["classes"], xlabel="named by the caption", ylabel="true", title=title)
    ax.tick_params(axis="x", labelrotation=45)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    fig.savefig(path, format="png")
    return Path(path)


def write_plots(result: dict, out: Path) -> dict[str, str]:
    """The PNGs that the result has data for; returns {plot name: file name}."""
    plots = {}
    if result.get("model", {}).get("per_au_f1"):
        plots["au_f1"] = plot_au_f1(result, out / "au_f1.png").name
    if result.get("model", {}).get("emotion_confusion"):
        plots["emotion_confusion"] = plot_confusion(result["model"]["emotion_confusion"],
                                                    out / "emotion_confusion.png").name
    return plots


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write metrics.json (the whole result), the PNG plots and report.md into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    plots = write_plots(result, out)
    (out / "report.md").write_text(report_markdown(result, plots))
    return out


# ---------------------------------------------------------------- MLflow


def eval_metrics(result: dict) -> dict[str, float]:
    """The result's numbers as flat MLflow metrics: eval.au_f1, eval.au_f1.au12, eval.emotion_accuracy,
    eval.baseline.<key>.{au_f1,emotion_accuracy} per baseline, eval.best_baseline.*, caption and probe scores."""
    out: dict[str, float | None] = {}
    model = result.get("model")
    if model:
        out["eval.au_f1"] = model.get("mean_au_f1")
        out["eval.emotion_accuracy"] = model.get("emotion_accuracy")
        out.update({f"eval.au_f1.au{au}": f1 for au, f1 in model.get("per_au_f1", {}).items()})
    for b in _baselines(result):
        out[f"eval.baseline.{b['key']}.au_f1"] = b.get("mean_au_f1")
        out[f"eval.baseline.{b['key']}.emotion_accuracy"] = b.get("emotion_accuracy")
    for metric, short in (("mean_au_f1", "au_f1"), ("emotion_accuracy", "emotion_accuracy")):
        best = (result.get("best") or {}).get(metric)
        out[f"eval.best_baseline.{short}"] = best["score"] if best else None
    for prefix, part in (("eval.", "model"), ("eval.baseline.most_frequent.", "baseline")):
        scores = (result.get("captions") or {}).get(part, {})
        out.update({prefix + name: scores.get(name) for name in (*COCO_METRICS, *BEST_METRICS) if scores})
    for probe in result.get("probes") or []:
        if "score" in probe:
            name = probe["features"] + ("_concat" if "concat" in probe["pooling"] else "")
            short = "au_f1" if probe["metric"] == "mean_au_f1" else probe["metric"]
            out[f"eval.probe.{name}.{short}"] = probe["score"]
            out[f"eval.probe.{name}.{short}.baseline"] = probe["baseline"]["score"]
    return {k: float(v) for k, v in out.items() if v is not None}


def find_mlflow_run(model_dir: str | Path) -> dict | None:
    """{"run_id", "tracking_uri"} of the training run that produced a run directory (or its export/), else None."""
    path = Path(model_dir)
    for candidate in (path / MLFLOW_RUN_FILE, path.parent / MLFLOW_RUN_FILE):
        if candidate.is_file():
            info = json.loads(candidate.read_text())
            return {"run_id": info["run_id"], "tracking_uri": unredact_uri(info["tracking_uri"])}  # stored redacted
    return None


def _artifact_root(tracking_uri: str) -> str | None:
    """Beside a SQLite store (never the working directory); a server's own default otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def _new_run(client, tracking_uri: str, experiment: str, run_name: str | None) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_root(tracking_uri))
    return client.create_run(experiment_id, run_name=run_name or "evaluation").info.run_id


def log_to_mlflow(result: dict, out_dir: str | Path, tracking_uri: str, run_id: str | None = None,
                  experiment: str = "expblip-eval", run_name: str | None = None) -> str:
    """Log eval.* metrics and the report files (under artefacts ``eval/``) into run ``run_id`` — the training run —
    or, without one, into a new run of ``experiment``. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    new = run_id is None
    run_id = _new_run(client, tracking_uri, experiment, run_name) if new else client.get_run(run_id).info.run_id
    stamp = int(time.time() * 1000)
    metrics = [Metric(key, value, stamp, 0) for key, value in eval_metrics(result).items()]
    for start in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + METRIC_BATCH])
    settings = result.get("settings", {})
    for key in ("export", "shards"):
        if key in settings:
            client.set_tag(run_id, f"eval.{key}", str(settings[key]))
    client.log_artifacts(run_id, str(out_dir), artifact_path=ARTIFACT_DIR)
    if new:
        client.set_terminated(run_id)
    return run_id
