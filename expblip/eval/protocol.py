"""The field's AU-detection protocol: one export per subject-exclusive fold, per-AU F1 per fold, the mean over folds.

    job = EvalJob(model="runs/bp4d_fold{fold}", shards="shards/bp4d/fold{fold}/test",
                  train_shards="shards/bp4d/fold{fold}/train", protocol="bp4d-3fold", probe=["qformer"],
                  probe_train_shards="shards/bp4d/fold{fold}/train")
    summary = run_protocol(job)        # prints the per-fold table and the summary beside the reference numbers

``{fold}`` in the model and shard paths becomes 1, 2, 3 (the folds of expblip.data.sources.folds: make the shards
with ``make_shards.py ... --fold K --folds 3``). Each fold is evaluated exactly as ``launch/evaluate.py`` evaluates
one export (expblip.eval.job.evaluate), on the dataset's AU subset (BP4D 12 AUs, DISFA the usual 8), so every
learned score keeps its strongest free baseline: the best constant caption (or chance) for the text-parsed AUs,
the all-positive prediction for a linear probe. F1 is printed in per cent, as the field reports it.

Before any fold runs, each fold's shards are checked against their manifest (expblip.eval.provenance): the test
shards must hold that fold's whole test split of the protocol's dataset, every frame (``--no-subsample``), and the
training shards that fold's training split; ``--limit`` is refused (the test split is never cut) and ``--aus`` may
only name the protocol's AU set.

The reference rows are published numbers on the real datasets, each with its backbone and what it averages: the
mean over the 3 folds (ME-GraphAU, both backbones it reports) or one split (the paper's linear-probe table,
EXPBLIP.md: fold 1's 13 BP4D test subjects, printed under fold 1). They compare with these only when the shards were
made from the real dataset with the same folds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from expblip.eval.job import EvalJob, evaluate
from expblip.eval.provenance import check_fold_shards

FOLD = "{fold}"  # the placeholder in paths


@dataclass(frozen=True)
class Reference:
    """One published mean F1 (%): who, on which backbone, over which fold(s)."""

    who: str
    backbone: str
    score: float
    fold: int | None = None  # None: the mean over the protocol's folds; K: that fold's test subjects alone


@dataclass(frozen=True)
class Protocol:
    """One dataset's cross-validation protocol and the published numbers to print beside it."""

    name: str
    dataset: str  # the make_shards source the folds come from
    aus: str  # the key of expblip.data.facs.DATASET_AUS scored
    folds: int
    references: tuple[Reference, ...]  # specialised AU detectors
    probe_references: tuple[Reference, ...] = ()  # the paper's linear probes


ME_GRAPHAU = "ME-GraphAU (Luo et al., IJCAI 2022)"  # numbers: its paper's tables, as its README (CVI-SZU/ME-GraphAU) lists
PAPER_BACKBONE = "EVA-CLIP ViT-g/14"  # the paper's image encoder (EXPBLIP.md, Model)

PROTOCOLS: dict[str, Protocol] = {
    "bp4d-3fold": Protocol(
        "bp4d-3fold", "bp4d", "bp4d", 3,
        references=(Reference(f"{ME_GRAPHAU}, real BP4D", "ResNet-50", 64.7),
                    Reference(f"{ME_GRAPHAU}, real BP4D", "Swin-B", 65.5)),
        # the paper's BP4D test set is one split, fold 1's 13 subjects (docs/datasets.md, "The paper's splits")
        probe_references=(Reference("ViT-G of the original BLIP-2 (paper)", PAPER_BACKBONE, 59.5, fold=1),
                          Reference("Q-Former of AU-BLIP (paper)", PAPER_BACKBONE, 66.6, fold=1),
                          Reference("Q-Former of Emot-BLIP (paper)", PAPER_BACKBONE, 58.3, fold=1),
                          Reference("Q-Former of Exp-BLIP (paper)", PAPER_BACKBONE, 66.2, fold=1))),
    "disfa-3fold": Protocol(
        "disfa-3fold", "disfa", "disfa8", 3,
        references=(Reference(f"{ME_GRAPHAU}, real DISFA", "ResNet-50", 63.1),
                    Reference(f"{ME_GRAPHAU}, real DISFA", "Swin-B", 62.4))),
}


def check_job(job: EvalJob) -> Protocol:
    """The job's protocol; ValueError naming what is wrong with a protocol job."""
    if job.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {job.protocol!r}; choose one of {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[job.protocol]
    templated = {"--model": job.model, "--shards": job.shards}
    if job.probe:
        templated["--probe-train-shards"] = job.probe_train_shards
    missing = [flag for flag, value in templated.items() if FOLD not in value]
    if missing:
        raise ValueError(f"--protocol {job.protocol} evaluates one export per fold: put {FOLD} in {', '.join(missing)}"
                         f" (e.g. --shards shards/{protocol.dataset}/fold{FOLD}/test)")
    if job.train_shards and FOLD not in job.train_shards:
        raise ValueError(f"--train-shards must name each fold's training shards with {FOLD}")
    if job.aus and job.aus != protocol.aus:
        raise ValueError(f"--protocol {job.protocol} scores the {protocol.aus} AUs (those {protocol.dataset} labels, "
                         f"as the field reports them); drop --aus {job.aus}")
    if job.limit is not None:
        raise ValueError(f"--protocol {job.protocol} scores each fold's whole test split: drop --limit (outside "
                         "--protocol it evaluates a seeded random subset, for quick looks); --probe-limit cuts only "
                         "the probes' training part")
    if job.mlflow:
        raise ValueError("--mlflow is not supported with --protocol yet; each fold's report is written under --out")
    return protocol


def check_shards(job: EvalJob, protocol: Protocol) -> None:
    """ValueError naming the manifest and the fix unless every fold's shards are that fold's splits (before any
    fold runs: a wrong fold 3 must not surface after hours of folds 1 and 2)."""
    for fold in range(1, protocol.folds + 1):
        one = fold_job(job, protocol, fold)
        check_fold_shards(one.shards, "test", protocol.dataset, fold, protocol.folds)
        for role, spec in (("--train-shards", one.train_shards), ("--probe-train-shards", one.probe_train_shards)):
            if spec:
                check_fold_shards(spec, "train", protocol.dataset, fold, protocol.folds, role)


def fold_job(job: EvalJob, protocol: Protocol, fold: int) -> EvalJob:
    """The plain evaluation of fold ``fold``: paths filled in, the protocol's AUs, the report under out/foldK."""
    fill = {name: getattr(job, name).replace(FOLD, str(fold))
            for name in ("model", "shards", "train_shards", "probe_train_shards")}
    out = str(Path(job.out) / f"fold{fold}") if job.out else ""
    return dataclasses.replace(job, **fill, out=out, aus=protocol.aus, protocol="", mlflow=False)


# ---------------------------------------------------------------- summarising the folds


def _fold_row(result: dict) -> dict:
    """What one fold contributes: the text-parsed scores, the strongest AU baseline, the AU probes."""
    best = result["best"]["mean_au_f1"]
    base = next(b for b in result["baselines"] if b["key"] == best["key"])
    probes = {p["features"] + ("" if p["pooling"] in ("patch mean", "query mean") else f" ({p['pooling']})"): p
              for p in result.get("probes") or [] if p.get("task") == "au" and "score" in p}
    return {"model": {"mean": result["model"]["mean_au_f1"], "per_au": result["model"]["per_au_f1"]},
            "baseline": {"name": base["name"], "mean": base["mean_au_f1"], "per_au": base["per_au_f1"]},
            "probes": {name: {"mean": p["score"], "per_au": p["per_au_f1"],
                              "baseline": {"name": p["baseline"]["name"], "mean": p["baseline"]["score"],
                                           "per_au": p["baseline"]["per_au_f1"]}} for name, p in probes.items()},
            "samples": result["model"]["counts"]["au_labelled"]}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _average(scores: Sequence[dict], aus: Sequence[int]) -> dict:
    """{"mean", "per_au"} averaged over folds (per AU, and the mean of the per-fold means)."""
    return {"mean": _mean([s["mean"] for s in scores]),
            "per_au": {au: _mean([s["per_au"][au] for s in scores]) for au in aus}}


def summarize(protocol: Protocol, aus: Sequence[int], results: Sequence[dict]) -> dict:
    """Per-fold and mean-over-folds scores of the text-parsed model, its strongest baseline and every AU probe."""
    folds = [_fold_row(r) for r in results]
    probe_names = sorted(set.intersection(*(set(f["probes"]) for f in folds))) if folds else []
    mean = {"model": _average([f["model"] for f in folds], aus),
            "baseline": _average([f["baseline"] for f in folds], aus),
            "probes": {n: {**_average([f["probes"][n] for f in folds], aus),
                           "baseline": _average([f["probes"][n]["baseline"] for f in folds], aus)}
                       for n in probe_names}}
    return {"protocol": dataclasses.asdict(protocol), "aus": list(aus), "folds": folds, "mean": mean,
            "probe_names": probe_names}


# ---------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def per_au_table(summary: dict) -> str:
    """Markdown: per-AU F1 (%) of each predictor on each fold, then the mean over folds."""
    aus = summary["aus"]
    rows = ["| predictor | fold | " + " | ".join(f"AU{a}" for a in aus) + " | mean |",
            "|---|---|" + "---:|" * (len(aus) + 1)]

    def row(name: str, fold: str, scores: dict) -> str:
        return (f"| {name} | {fold} | " + " | ".join(_pct(scores["per_au"][a]) for a in aus)
                + f" | **{_pct(scores['mean'])}** |")

    predictors = [("text-parsed captions", lambda s: s["model"]), ("strongest free baseline", lambda s: s["baseline"])]
    for name in summary["probe_names"]:
        predictors += [(f"linear probe: {name}", lambda s, n=name: s["probes"][n]),
                       (f"{name} probe baseline (all-positive)", lambda s, n=name: s["probes"][n]["baseline"])]
    for name, pick in predictors:
        rows += [row(name, str(k), pick(f)) for k, f in enumerate(summary["folds"], 1)]
        rows.append(row(name, "mean", pick(summary["mean"])))
    return "\n".join(rows)


def _baseline_name(folds: Sequence[dict]) -> str:
    names = {f["baseline"]["name"] for f in folds}
    return names.pop() if len(names) == 1 else "each fold's strongest"


def summary_table(summary: dict) -> str:
    """Markdown: mean AU F1 (%) per fold and over folds, text-parsed and probes each beside its strongest free
    baseline, then the published reference numbers."""
    folds, mean = summary["folds"], summary["mean"]
    n = len(folds)
    rows = ["| predictor | " + " | ".join(f"fold {k}" for k in range(1, n + 1))
            + " | mean over folds | strongest free baseline (mean over folds) |", "|---|" + "---:|" * (n + 2)]
    rows.append("| text-parsed captions (this export) | " + " | ".join(_pct(f["model"]["mean"]) for f in folds)
                + f" | **{_pct(mean['model']['mean'])}** | {_pct(mean['baseline']['mean'])} "
                  f"({_baseline_name(folds)}) |")
    for name in summary["probe_names"]:
        rows.append(f"| linear probe on {name} features (this export) | "
                    + " | ".join(_pct(f["probes"][name]["mean"]) for f in folds)
                    + f" | **{_pct(mean['probes'][name]['mean'])}** | {_pct(mean['probes'][name]['baseline']['mean'])}"
                      " (all-positive) |")
    protocol = summary["protocol"]
    rows += [reference_row("reference", ref, n) for ref in protocol["references"]]
    rows += [reference_row("reference linear probe", ref, n) for ref in protocol["probe_references"]]
    return "\n".join(rows)


def reference_row(kind: str, ref: dict, folds: int) -> str:
    """A published number in its own column: a fold's (one split) or the mean over folds, never one for the other."""
    fold = ref.get("fold")
    over = f"one split: fold {fold}'s test subjects" if fold else f"mean over {folds} folds"
    cells = [f"{ref['score']:.1f}" if k == fold else "" for k in range(1, folds + 1)]
    cells += ["" if fold else f"{ref['score']:.1f}", ""]
    return f"| {kind}: {ref['who']}; backbone {ref['backbone']}; {over} | " + " | ".join(cells) + " |"


def verdict(summary: dict) -> str:
    """The last line: the mean over folds of the text-parsed F1 beside its strongest free baseline."""
    mean, protocol = summary["mean"], summary["protocol"]
    return (f"{protocol['name']}: mean AU F1 over {len(summary['folds'])} folds: {_pct(mean['model']['mean'])} "
            f"(strongest free baseline: {_pct(mean['baseline']['mean'])})")


def protocol_markdown(summary: dict) -> str:
    protocol = summary["protocol"]
    lines = [f"# {protocol['name']}: subject-exclusive {protocol['folds']}-fold AU detection", "",
             f"AUs scored: {', '.join(map(str, summary['aus']))}. F1 in per cent, per AU and fold, then the mean over "
             "folds (the field's convention). Reference rows are published numbers on the real dataset, each with "
             "its backbone, in the column of what it averages: the mean over folds, or one fold for a single split "
             "(the paper's probes: fold 1's test subjects); they compare with these only when the shards come from "
             "the real dataset with the same folds.", "",
             "## Summary", "", summary_table(summary), "", "## Per AU and fold", "", per_au_table(summary), "",
             verdict(summary), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- running it


def run_protocol(job: EvalJob) -> dict:
    """Evaluate every fold's export, write the reports (with ``job.out``), print the tables; returns the summary."""
    from expblip.data.facs import DATASET_AUS
    from expblip.eval.report import write_report

    protocol = check_job(job)
    check_shards(job, protocol)
    results = []
    for fold in range(1, protocol.folds + 1):
        one = fold_job(job, protocol, fold)
        print(f"[expblip] {protocol.name}: fold {fold}/{protocol.folds}: {one.model} on {one.shards}", flush=True)
        results.append(evaluate(one))
        if one.out:
            write_report(results[-1], one.out)
    summary = summarize(protocol, DATASET_AUS[protocol.aus], results)
    text = protocol_markdown(summary)
    if job.out:
        out = Path(job.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "protocol.md").write_text(text)
        (out / "protocol.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(text, flush=True)
    return summary
