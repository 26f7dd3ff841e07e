"""A recipe's chain over several training seeds: mean ± SD of every model's scores, and each comparison's paired
interval per seed with the verdict they support together.

    python launch/pipeline.py --recipe exp_blip --seeds 3      # seeds 0, 1, 2 in OUT/seed0, OUT/seed1, OUT/seed2
    summary = summarise([result_seed0, result_seed1, result_seed2])   # run_pipeline's results
    print(summary["table"])

A seed varies every stage's initialisation and data order (``train.seed``), never the world: the test faces are
the same in every seed, so the seeds' numbers differ only by training. The verdict of a comparison is "met" only
when every seed's interval is above 0, "not met" only when every seed's is below, else "not resolved at this test
size".
"""

from __future__ import annotations

from collections.abc import Sequence

from expblip.eval.intervals import MET, NOT_MET, NOT_RESOLVED, mean_sd

METRICS = ("mean_au_f1", "emotion_accuracy", "names_both", "emotion_false_positive_rate")


def _fmt(values: Sequence[float | None]) -> str:
    if any(v is None for v in values):
        return "-"
    return str(mean_sd(values)).replace(f" ({len(values)} seeds)", "")


def _joint_verdict(verdicts: Sequence[str]) -> str:
    if all(v == MET for v in verdicts):
        return MET
    if all(v == NOT_MET for v in verdicts):
        return NOT_MET
    return NOT_RESOLVED


def summarise(results: Sequence[dict]) -> dict:
    """{"models": {model: {metric: [per seed]}}, "comparisons": [{comparison, metric, estimates, intervals,
    verdict}], "table": markdown} over run_pipeline's results of each seed (same recipe, same world)."""
    seeds = len(results)
    models: dict[str, dict[str, list]] = {}
    for result in results:
        for row in result["rows"]:
            entry = models.setdefault(row["model"], {m: [] for m in METRICS})
            for metric in METRICS:
                entry[metric].append(row.get(metric))
    comparisons: dict[tuple[str, str], dict] = {}
    for result in results:
        for c in result.get("comparisons") or []:
            entry = comparisons.setdefault((c["comparison"], c["metric"]), {"estimates": [], "intervals": [],
                                                                           "verdicts": []})
            entry["estimates"].append(c["interval"]["estimate"])
            entry["intervals"].append((c["interval"]["low"], c["interval"]["high"]))
            entry["verdicts"].append(c["verdict"])
    rows = [{"comparison": what, "metric": metric, "estimates": e["estimates"], "intervals": e["intervals"],
             "verdict": _joint_verdict(e["verdicts"]) if len(e["verdicts"]) == seeds else NOT_RESOLVED}
            for (what, metric), e in comparisons.items()]
    return {"seeds": seeds, "models": models, "comparisons": rows, "table": _table(models, rows, seeds)}


def _table(models: dict, rows: list[dict], seeds: int) -> str:
    lines = [f"Over {seeds} training seeds (the same world and test faces): mean ± SD.", "",
             "| model | mean AU F1 | emotion accuracy | names AUs and an emotion | names an emotion where none is right |",
             "|---|---:|---:|---:|---:|"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
    if rows:
        lines += ["", "| comparison | metric | difference, mean ± SD | 95 % interval of each seed (patterns "
                  "resampled) | verdict (A better, every seed) |", "|---|---|---:|---|---|"]
        for r in rows:
            spans = ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in r["intervals"])
            lines.append(f"| {r['comparison']} | {r['metric']} | {_fmt(r['estimates'])} | {spans} | {r['verdict']} |")
    return "\n".join(lines)
