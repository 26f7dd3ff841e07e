"""Compare training runs recorded in MLflow: a side-by-side table of what differs and where each run ended, and a
PNG of their curves.

    runs = load_runs("expblip-demo", "sqlite:///runs/mlflow.db", filter_string="params.optim.lr = '0.0001'")
    print(comparison_table(runs))          # one column per run: name, id, status, differing params, final metrics
    plot_curves(runs, "loss", "compare.png")

The store is any MLflow tracking URI (SQLite file or server); the training runs log the flattened config as params
(``optim.lr``...) and ``loss``/``lr``/``samples_per_s``... per step, evaluation adds ``eval.*`` (expblip.eval.report).
Only MLflow is read: no Ray, DeepSpeed or torch, and mlflow itself is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

MISSING = "—"
MAX_CELL = 40  # characters of a parameter value shown in a table cell


class CompareError(ValueError):
    """The store, experiment or filter cannot be read; the message names it and how to fix it."""


@dataclass
class RunSummary:
    """One MLflow run as the comparison sees it."""

    run_id: str
    name: str
    status: str  # FINISHED, RUNNING, FAILED, KILLED
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the final (latest-step) value of every metric
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, value) of the plotted metric

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


# ---------------------------------------------------------------- the store


def resolve_uri(uri: str | None = None) -> str:
    """uri, else $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db). A path to a .db file, or to a
    directory holding mlflow.db (a run directory), becomes a sqlite:/// URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" in uri:
        return uri
    path = Path(uri)
    if path.is_dir():
        path = path / "mlflow.db"
    return f"sqlite:///{path.resolve()}"


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI: a server that does not answer /health, or a SQLite file that does not exist.

    (MLflow's own client retries an unreachable server with back-off for minutes; SQLite would silently create an
    empty store and then report the experiment missing.)"""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                resp.read()
        except OSError as err:
            raise CompareError(f"MLflow tracking server {uri} is unreachable ({err}); start it (make mlflow) or pass "
                               f"--tracking-uri / set MLFLOW_TRACKING_URI to a reachable server") from err
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite://"):])
        if not path.is_file():
            raise CompareError(f"no MLflow store at {uri} ({path} does not exist); pass --tracking-uri "
                               f"sqlite:///PATH/mlflow.db (a run directory's store) or a server URI")


def _experiment_id(client, experiment: str, uri: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"experiment {experiment!r} not found in {uri}; it holds: "
                           f"{', '.join(names) or 'no experiments'}")
    return found.experiment_id


def load_runs(experiment: str, tracking_uri: str | None = None, filter_string: str = "", metric: str = "loss",
              max_runs: int = 50) -> list[RunSummary]:
    """Runs of `experiment` matching `filter_string` (MLflow search syntax), oldest first, with `metric`'s curve."""
    uri = resolve_uri(tracking_uri)
    check_store(uri)  # before importing mlflow (~2 s): a wrong URI fails at once
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    try:
        found = client.search_runs([experiment_id], filter_string=filter_string, max_results=max_runs,
                                   order_by=["attributes.start_time ASC"])
    except MlflowException as err:
        raise CompareError(f"bad --filter {filter_string!r}: {err.message} (example: \"params.optim.lr = "
                           f"'0.0001'\"; params are strings, quote the value)") from err
    if not found:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise CompareError(f"no runs in experiment {experiment!r}{where} at {uri}")
    return [_summary(client, run, metric) for run in found]


def _summary(client, run, metric: str) -> RunSummary:
    history = client.get_metric_history(run.info.run_id, metric) if metric in run.data.metrics else []
    curve = sorted((m.step, m.value) for m in history)
    return RunSummary(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                      dict(run.data.params), dict(run.data.metrics), curve)


# ---------------------------------------------------------------- the table


def differing_params(runs: list[RunSummary]) -> list[str]:
    """Parameter names whose value (or presence) is not the same in every run, sorted."""
    keys = sorted(set().union(*(r.params for r in runs)))
    return [k for k in keys if len({r.params.get(k, MISSING) for r in runs}) > 1]


def metric_names(runs: list[RunSummary]) -> list[str]:
    """Every metric logged by any run: training metrics first, then eval.*, each group sorted."""
    names = set().union(*(r.metrics for r in runs))
    return sorted(names, key=lambda n: (n.startswith("eval."), n))


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.6g}"


def _clip(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def comparison_rows(runs: list[RunSummary], metric: str = "loss") -> list[list[str]]:
    """The table as rows of cells: a label column, then one column per run. Section rows have one cell."""
    diff = differing_params(runs)
    n_params = len(set().union(*(r.params for r in runs)))
    rows = [["run", *(r.name for r in runs)], ["run id", *(r.run_id for r in runs)],
            ["status", *(r.status for r in runs)],
            [f"params that differ ({len(diff)} of {n_params}; equal ones hidden)"]]
    rows += [[k, *(_clip(r.params.get(k, MISSING)) for r in runs)] for k in diff]
    rows.append(["final metrics"])
    rows += [[m, *(_fmt(r.metrics.get(m)) for r in runs)] for m in metric_names(runs)]
    rows.append([f"{metric} last step", *(str(r.curve[-1][0]) if r.curve else MISSING for r in runs)])
    return rows


def comparison_table(runs: list[RunSummary], metric: str = "loss") -> str:
    """Plain-text table, columns aligned; section headings as ruled lines."""
    rows = comparison_rows(runs, metric)
    widths = [max(len(row[i]) for row in rows if len(row) > 1) for i in range(len(runs) + 1)]
    total = sum(widths) + 2 * len(runs)
    lines = []
    for row in rows:
        if len(row) == 1:
            lines.append(f"-- {row[0]} " + "-" * max(0, total - len(row[0]) - 4))
        else:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- the plot


def plot_curves(runs: list[RunSummary], metric: str, path: str | Path) -> Path:
    """One line per run of `metric` against step (matplotlib's Agg canvas, object API: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plotted = [r for r in runs if r.curve]
    if not plotted:
        raise CompareError(f"no run logged metric {metric!r}; choose one of: {', '.join(metric_names(runs))}")
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in plotted:
        steps, values = zip(*run.curve, strict=True)
        ax.plot(steps, values, label=run.label, linewidth=1.8, marker="o" if len(steps) < 20 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of {len(plotted)} run(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def compare(experiment: str, tracking_uri: str | None = None, filter_string: str = "", metric: str = "loss",
            out: str | Path | None = "compare.png") -> tuple[str, Path | None]:
    """Load, tabulate and plot: returns (table text, PNG path or None when out is None)."""
    runs = load_runs(experiment, tracking_uri, filter_string, metric)
    table = comparison_table(runs, metric)
    return table, (plot_curves(runs, metric, out) if out else None)
