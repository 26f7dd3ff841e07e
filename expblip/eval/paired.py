"""Paired intervals between evaluation results on the same test faces: a model against the strongest baseline and
against another model, each metric through expblip.eval.intervals.paired_bootstrap.

    rows = comparisons({"exp_blip": r_exp, "au_blip": r_au}, "exp_blip", r_exp["best"])
    # [{"comparison": "Exp-BLIP − strongest baseline (every AU of the training labels)", "metric": "mean_au_f1",
    #   "interval": Interval(...), "verdict": "met"}, ...]

Each result is evaluate_export's, with its per-face ``items`` (keys, captions, scored labels). Faces that share an
AU pattern are not independent evidence (the synthetic world draws each held-out pattern many times; a subject's
frames repeat one face), so whole patterns are resampled: the group of a face is its AU combination, or its key
where it has no AU label. The verdict is the one the interval supports for "A is better than B" (margin 0): met,
not met, or not resolved at this test size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from expblip.eval.intervals import Interval, paired_bootstrap, verdict
from expblip.eval.metrics import emotion_accuracy
from expblip.infer.parse import parse_caption

RESAMPLES = 2000


def _au_matrix(sets: Sequence[set[int]], aus: Sequence[int]) -> np.ndarray:
    return np.array([[au in s for au in aus] for s in sets], dtype=bool).reshape(len(sets), len(aus))


def mean_au_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """expblip.eval.metrics.au_f1's mean (binary F1 per AU, zero_division=0) on indicator matrices [faces, AUs]:
    2TP / (2TP + FP + FN) per column, vectorised for thousands of resamples."""
    tp = (truth & pred).sum(axis=0)
    wrong = (truth ^ pred).sum(axis=0)
    denominator = 2 * tp + wrong
    return float(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0).mean())


def _rows(result: dict, metric: str) -> list[int]:
    labels = result["items"]["labels"]
    if metric == "mean_au_f1":
        return [i for i, lab in enumerate(labels) if lab.get("aus") is not None]
    return [i for i, lab in enumerate(labels) if lab.get("emotions")]


def _groups(result: dict, rows: list[int]) -> list[str]:
    labels, keys = result["items"]["labels"], result["items"]["keys"]
    return ["+".join(map(str, sorted(labels[i]["aus"]))) if labels[i].get("aus") is not None else keys[i]
            for i in rows]


def _predictions(captions: Sequence[str], rows: list[int], metric: str, aus: Sequence[int]):
    parsed = [parse_caption(captions[i]) for i in rows]
    if metric == "mean_au_f1":
        return _au_matrix([set(p["aus"]) for p in parsed], aus)
    return [set(p["emotions"]) for p in parsed]


def interval(metric: str, a: dict, b: dict | str | float | None = None, n: int = RESAMPLES) -> Interval:
    """metric(A) − metric(B) over A's test faces, whole AU patterns resampled. ``b``: another result on the same
    faces, a constant caption (a baseline's), a number fixed before the test, or None (A's own interval)."""
    rows, aus = _rows(a, metric), a["settings"]["aus"]
    if not rows:
        raise ValueError(f"no test face carries the labels {metric} needs")
    labels = a["items"]["labels"]
    if metric == "mean_au_f1":
        truth, score = _au_matrix([set(labels[i]["aus"]) for i in rows], aus), mean_au_f1
    else:
        truth, score = [set(labels[i]["emotions"]) for i in rows], emotion_accuracy
    pred_a = _predictions(a["items"]["captions"], rows, metric, aus)
    if isinstance(b, dict):
        if b["items"]["keys"] != a["items"]["keys"]:
            raise ValueError("the two results scored different faces (or another order): compare results on the "
                             "same test shards")
        pred_b = _predictions(b["items"]["captions"], rows, metric, aus)
    elif isinstance(b, str):
        pred_b = _predictions([b] * len(labels), rows, metric, aus)
    else:
        pred_b = b
    return paired_bootstrap(score, truth, pred_a, pred_b, groups=_groups(a, rows), n=n)


def _baseline_side(best: dict, metric: str, baselines: list[dict]) -> str | float | None:
    """The strongest baseline of ``metric`` as a constant caption, or its score where it is no caption (chance)."""
    entry = best.get(metric)
    if not entry:
        return None
    row = next((b for b in baselines if b["key"] == entry["key"]), None)
    return row["caption"] if row and row.get("caption") else float(entry["score"])


def comparisons(results: dict[str, dict], target: str, names: dict[str, str], metrics: Sequence[str] = (
        "mean_au_f1", "emotion_accuracy")) -> list[dict]:
    """The target against the strongest baseline of each metric (chosen on the training labels), then against every
    other model, on each metric both sides score. Rows: comparison, metric, interval, verdict."""
    a = results[target]
    out = []
    for metric in metrics:
        if a["model"].get(metric) is None:
            continue
        side = _baseline_side(a["best"], metric, a["baselines"])
        if side is not None:
            name = a["best"][metric].get("name", a["best"][metric]["key"])
            out.append(_row(f"{names[target]} − strongest baseline ({name})", metric, interval(metric, a, side)))
        for key, other in results.items():
            if key != target and other["model"].get(metric) is not None and "items" in other:
                out.append(_row(f"{names[target]} − {names[key]}", metric, interval(metric, a, other)))
    return out


def _row(what: str, metric: str, iv: Interval) -> dict:
    return {"comparison": what, "metric": metric, "interval": iv.as_dict(), "verdict": verdict(iv)}


def comparison_table(rows: list[dict]) -> str:
    """Markdown: each comparison's difference, its 95 % interval (whole patterns resampled) and the verdict."""
    lines = ["| comparison | metric | difference | 95 % interval | resampled | verdict (A better) |",
             "|---|---|---:|---|---|---|"]
    for r in rows:
        iv = r["interval"]
        lines.append(f"| {r['comparison']} | {r['metric']} | {iv['estimate']:+.3f} | [{iv['low']:+.3f}, "
                     f"{iv['high']:+.3f}] | {iv['units']} {iv['resampled']} of {iv['items']} faces | {r['verdict']} |")
    return "\n".join(lines)
