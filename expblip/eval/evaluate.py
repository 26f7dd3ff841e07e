"""Held-out evaluation of an export: generate captions, parse them into AUs and emotions, score against the labels,
beside every baseline that costs nothing.

    train = training_text("demo/shards/train")          # captions and labels, read without decoding an image
    result = evaluate_export("runs/stage2/export", "demo/shards/test", train=train, caption_metrics=True)
    write_report(result, "runs/stage2/eval")            # metrics.json + report.md + plots (expblip.eval.report)
    print(summary_line(result))  # held-out mean AU F1: 0.861 (best constant caption: 0.412)

Scoring follows expblip.eval.metrics: per-AU binary F1 (zero_division=0, every AU in ``aus`` stays in the mean)
over the samples whose dataset labels AUs (``labels["aus"]`` is a list, possibly empty), and emotion accuracy over
the samples that carry at least one emotion label, with the strict rule: the emotions a caption names must equal
the true set (the confusion matrix adds the columns "several" and "none").

Baselines (``result["baselines"]``), each predicted for every held-out image and scored exactly like the model:
1. the most frequent training caption (ties: the first seen);
2. the best constant caption for each metric, chosen on the *training* labels: for AU F1 the rule caption naming
   every scored AU the training set shows (a constant prediction's F1 on an AU is 2p/(1+p) > 0 when it names it
   and 0 when not, so naming every AU that occurs is the best constant), for emotion accuracy the caption of the
   majority training emotion;
3. chance: every AU named with probability 1/2 (F1 of the expected counts, 2p/(1+2p)); one of the training set's
   K emotion classes drawn uniformly (1/K).
``result["best"]`` names the strongest baseline of each metric: a learned score means something only above it.
Without training text the held-out references and labels stand in; that uses the test labels and is an optimistic
(harder to beat) choice, and ``result["baseline_source"]`` says so.
With ``caption_metrics`` the generated captions are also scored as text against all reference captions of each
image (expblip.eval.caption_metrics), beside the most frequent training caption.

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from expblip.data import stream
from expblip.data.captions import au_caption, emotion_caption
from expblip.data.facs import DATASET_AUS, EMOTIONS
from expblip.data.shards import resolve_shards
from expblip.eval.caption_metrics import caption_scores
from expblip.eval.metrics import CONFUSION_EXTRA, au_f1, emotion_accuracy, emotion_confusion
from expblip.infer.captioner import Captioner, resolve_export
from expblip.infer.parse import parse_caption
from expblip.model.generation import GenerationConfig
from expblip.pixels import CLIP_MEAN, CLIP_STD

SAMPLES_KEPT = 20  # examples stored in the result and the report


# ---------------------------------------------------------------- scoring captions


def evaluate_captions(captions: Sequence[str], labels: Sequence[dict], aus: Sequence[int]) -> dict:
    """Score captions against per-sample labels ``{"aus": list | None, "emotions": list | None}``.

    Returns {"mean_au_f1", "per_au_f1" {au: f1}, "emotion_accuracy", "emotion_false_positive_rate",
    "emotion_by_pattern", "counts"}; a score is None when no sample carries that kind of label.

    ``labels[i]["no_emotion"]`` marks a face on which no emotion is right (the synthetic world's faces outside every
    emotion family; ``emotions=None`` alone means *not labelled*): the share of those whose caption names an emotion
    is the false-positive rate. ``names_both`` counts captions naming AUs and an emotion among the faces labelled
    with both (``both_labelled``). ``emotion_by_pattern``: emotion accuracy per AU pattern of the emotion faces
    that carry AU labels ({"1+2+5": {"emotion", "n", "right"}}), so a score resting on few patterns shows it.
    """
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} captions but {len(labels)} label sets; pass one caption per sample")
    parsed = [parse_caption(c) for c in captions]
    au_rows = [i for i, lab in enumerate(labels) if lab.get("aus") is not None]
    emo_rows = [i for i, lab in enumerate(labels) if lab.get("emotions")]
    f1 = None
    if au_rows:
        f1 = au_f1([set(labels[i]["aus"]) for i in au_rows], [set(parsed[i]["aus"]) for i in au_rows], list(aus))
    accuracy, confusion = None, None
    if emo_rows:
        truth, pred = [set(labels[i]["emotions"]) for i in emo_rows], [set(parsed[i]["emotions"]) for i in emo_rows]
        accuracy, confusion = emotion_accuracy(truth, pred), confusion_of(truth, pred)
    both_rows = [i for i in emo_rows if labels[i].get("aus") is not None]
    none_rows = [i for i, lab in enumerate(labels) if lab.get("no_emotion")]
    false_pos = sum(bool(parsed[i]["emotions"]) for i in none_rows)
    counts = {"samples": len(captions), "au_labelled": len(au_rows), "emotion_labelled": len(emo_rows),
              "both_labelled": len(both_rows), "no_emotion": len(none_rows),
              "nothing_parsed": sum(not p["aus"] and not p["emotions"] for p in parsed),
              "names_aus": sum(bool(p["aus"]) for p in parsed), "names_emotion": sum(bool(p["emotions"]) for p in parsed),
              "names_both": sum(bool(parsed[i]["aus"] and parsed[i]["emotions"]) for i in both_rows),
              "names_emotion_where_none": false_pos}
    return {"mean_au_f1": f1["mean"] if f1 else None, "per_au_f1": f1["per_au"] if f1 else {},
            "emotion_accuracy": accuracy, "emotion_confusion": confusion,
            "emotion_false_positive_rate": false_pos / len(none_rows) if none_rows else None,
            "emotion_by_pattern": _by_pattern(both_rows, labels, parsed), "counts": counts}


def _by_pattern(rows: Sequence[int], labels: Sequence[dict], parsed: Sequence[dict]) -> dict:
    """{"1+2+5": {"emotion", "n", "right"}} over the emotion faces with AU labels, patterns in sorted order."""
    out: dict[str, dict] = {}
    for i in rows:
        key = "+".join(str(au) for au in sorted(labels[i]["aus"])) or "none"
        entry = out.setdefault(key, {"emotion": ",".join(sorted(labels[i]["emotions"])), "n": 0, "right": 0})
        entry["n"] += 1
        entry["right"] += set(parsed[i]["emotions"]) == set(labels[i]["emotions"])
    return dict(sorted(out.items()))


def confusion_of(truth: Sequence[set[str]], pred: Sequence[set[str]]) -> dict | None:
    """{"classes", "columns", "matrix" [true][named]} over the single-emotion samples (None if none).

    Rows: the true classes; columns: those classes and any other emotion a caption names alone, then "several" and
    "none" (expblip.eval.metrics.emotion_confusion).
    """
    true_classes = {next(iter(t)) for t in truth if len(t) == 1}
    if not true_classes:
        return None
    named_alone = {next(iter(p)) for t, p in zip(truth, pred, strict=True) if len(t) == 1 and len(p) == 1}
    seen = true_classes | named_alone
    classes = [e for e in EMOTIONS if e in seen] + sorted(seen - set(EMOTIONS))
    matrix = emotion_confusion(truth, pred, classes)
    rows = [i for i, c in enumerate(classes) if c in true_classes]
    return {"classes": [classes[i] for i in rows], "columns": [*classes, *CONFUSION_EXTRA],
            "matrix": matrix[rows].tolist()}


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The most frequent caption (ties: the one seen first); surrounding whitespace is ignored."""
    if not captions:
        raise ValueError("no captions to pick a constant baseline from; pass training captions")
    return Counter(c.strip() for c in captions).most_common(1)[0][0]


@dataclass
class TrainingText:
    """What the baselines are chosen on: every training caption and every training sample's labels."""

    captions: list[str]
    labels: list[dict]  # {"aus": list | None, "emotions": list | None} per sample
    source: str = "train"  # or a note that held-out text stood in


def constant_captions(train: TrainingText, aus: Sequence[int]) -> list[tuple[str, str, str]]:
    """(key, name, caption) of each constant baseline that the training text defines (see the module docstring)."""
    out = [("most_frequent", "most frequent training caption", most_frequent_caption(train.captions))]
    seen_aus = sorted({a for lab in train.labels for a in lab.get("aus") or [] if a in set(aus)})
    if seen_aus:  # the best constant for AU F1
        out.append(("all_aus", "every AU of the training labels", au_caption(seen_aus)))
    emotions = Counter(e for lab in train.labels for e in lab.get("emotions") or [])
    if emotions:  # the best constant for emotion accuracy
        majority = emotions.most_common(1)[0][0]
        out.append(("majority_emotion", f"majority training emotion ({majority})", emotion_caption([majority])))
    return out


def chance_scores(train: TrainingText, labels: Sequence[dict], aus: Sequence[int]) -> dict:
    """Chance as a baseline row: AU F1 of naming each AU with probability 1/2 (expected counts: 2p/(1+2p), p the
    held-out prevalence), emotion accuracy 1/K over the K emotion classes of the training labels."""
    au_rows = [set(lab["aus"]) for lab in labels if lab.get("aus") is not None]
    per_au = {au: (2 * p / (1 + 2 * p) if p else 0.0) for au in aus
              for p in [sum(au in row for row in au_rows) / len(au_rows) if au_rows else 0.0]}
    classes = {e for lab in train.labels for e in lab.get("emotions") or []}
    has_emotions = any(lab.get("emotions") for lab in labels)
    return {"key": "chance", "name": "chance", "caption": None, "mean_au_f1": sum(per_au.values()) / len(per_au) if au_rows else None,
            "per_au_f1": per_au if au_rows else {},
            "emotion_accuracy": 1 / len(classes) if classes and has_emotions else None}


def baseline_rows(train: TrainingText, labels: Sequence[dict], aus: Sequence[int]) -> list[dict]:
    """Every baseline, scored on the held-out ``labels`` exactly like the model (chance analytically)."""
    rows = [{"key": key, "name": name, "caption": caption, **evaluate_captions([caption] * len(labels), labels, aus)}
            for key, name, caption in constant_captions(train, aus)]
    return [*rows, chance_scores(train, labels, aus)]


METRICS = ("mean_au_f1", "emotion_accuracy")
TASK_METRICS = {"describe": METRICS, "aus": ("mean_au_f1",), "emotion": ("emotion_accuracy",)}


def strongest(baselines: Sequence[dict]) -> dict:
    """{metric: {"score", "key", "name", "constant"}} of the best baseline per metric (None where none scores it);
    ``constant`` is False when chance is the strongest."""
    best: dict = {}
    for metric in METRICS:
        scored = [b for b in baselines if b.get(metric) is not None]
        top = max(scored, key=lambda b: b[metric], default=None)
        best[metric] = None if top is None else {"score": top[metric], "key": top["key"], "name": top["name"],
                                                 "constant": top["caption"] is not None}
    return best


# ---------------------------------------------------------------- reading shards


def training_text(shards: str, limit: int | None = None, lowercase: bool = True) -> TrainingText:
    """Every caption and every sample's labels of a shard spec, read from the JSON/txt members without decoding an
    image (``limit``: the first N samples). Lower-cased by default, as the stream lower-cases what a model trains on.
    """
    urls, _ = resolve_shards(shards)
    errors = stream.ErrorCounter.unlimited()  # skipped samples are counted and logged
    captions: list[str] = []
    labels: list[dict] = []
    for url in urls:
        for raw in stream.read_shard(url, errors):
            try:
                parsed = stream.parse_labels(raw)
                found = stream.sample_captions(parsed, raw)
            except Exception as bad:  # the stream's skip signal: bad JSON or no caption
                errors.add(getattr(bad, "kind", "bad_json"), url, f"{raw['__key__']}: {bad}")
                continue
            captions.extend(c.lower() if lowercase else c for c in found)
            labels.append(_label_fields(parsed))
            if limit is not None and len(labels) >= limit:
                return TrainingText(captions, labels)
    if not captions:
        raise ValueError(f"no captions could be read from {shards} (skipped: {errors.counts}); check the shard URL")
    return TrainingText(captions, labels)


def training_captions(shards: str, limit: int | None = None, lowercase: bool = True) -> list[str]:
    """Every caption of a shard spec (see training_text)."""
    return training_text(shards, limit, lowercase).captions


def renormalise(pixels: torch.Tensor | list[torch.Tensor], mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor | list[torch.Tensor]:
    """Stream pixels are CLIP-normalised; re-normalise [B,3,S,S] (or a list of [3,H_i,W_i]) to an export that uses
    another mean/std."""
    if tuple(mean) == tuple(CLIP_MEAN) and tuple(std) == tuple(CLIP_STD):
        return pixels
    if isinstance(pixels, list):
        return [renormalise(p[None], mean, std)[0] for p in pixels]

    def col(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=pixels.dtype).view(1, 3, 1, 1)

    return (pixels * col(CLIP_STD) + col(CLIP_MEAN) - col(mean)) / col(std)


def eval_batches(shards: str, image_size: int, batch_size: int, limit: int | None,
                 bounds: tuple[int, ...] = ()) -> Iterator[dict]:
    """Eval-transform batches of the shards, cut to their first ``limit`` samples in all (shard order: whole
    subjects of a video dataset; for training data only, see heldout_batches). ``bounds``: dynamic resolution
    (min_pixels, max_pixels, unit), pixel_values then a list of [3, H_i, W_i]."""
    cfg = stream.StreamConfig(shards=shards, train=False, batch_size=batch_size, image_size=image_size, shuffle_buffer=0,
                              dynamic=tuple(bounds))
    seen = 0
    for batch in stream.iterate_once(cfg):
        take = len(batch["keys"]) if limit is None else min(len(batch["keys"]), limit - seen)
        if take < len(batch["keys"]):
            batch = {k: v[:take] if k in ("pixel_values", "captions", "labels", "keys") else v for k, v in batch.items()}
        yield batch
        seen += take
        if limit is not None and seen >= limit:
            return


SUBSET_SEED = 0  # the held-out subset a limit draws
_ROW_KEYS = ("captions", "labels", "keys")  # the per-sample lists of a batch, beside pixel_values


def subset_positions(total: int, limit: int, seed: int = SUBSET_SEED) -> set[int]:
    """``limit`` of the ``total`` sample positions, drawn uniformly with a seeded generator: every subject has its
    chance, unlike the first N in shard order, which are whole subjects."""
    return set(random.Random(seed).sample(range(total), min(limit, total)))


def _rows(batch: dict, rows: Sequence[int]) -> dict:
    pixels = batch["pixel_values"]  # [B, 3, S, S], or a list of [3, H_i, W_i]
    picked = [pixels[i] for i in rows] if isinstance(pixels, list) else pixels[list(rows)]
    return {"pixel_values": picked, "errors": batch.get("errors", {}), **{k: [batch[k][i] for i in rows] for k in _ROW_KEYS}}


def _concat(parts: Sequence[dict]) -> dict:
    pixels = [p["pixel_values"] for p in parts]
    joined = [x for p in pixels for x in p] if isinstance(pixels[0], list) else torch.cat(pixels)
    return {"pixel_values": joined, "errors": parts[-1]["errors"], **{k: [x for p in parts for x in p[k]] for k in _ROW_KEYS}}


def heldout_batches(shards: str, image_size: int, batch_size: int, limit: int | None,
                    seed: int = SUBSET_SEED, bounds: tuple[int, ...] = ()) -> Iterator[dict]:
    """Eval-transform batches of the whole held-out split or, with ``limit``, of a seeded random ``limit`` of its
    samples drawn across the split (subset_positions), never the first N. The stream decodes every sample (the
    eval transforms stay the stream's own); only the drawn ones are yielded, ``batch_size`` at a time."""
    total = stream.count_samples(shards) if limit is not None else 0
    if limit is None or limit >= total:
        yield from eval_batches(shards, image_size, batch_size, None, bounds)
        return
    keep, seen, held = subset_positions(total, limit, seed), 0, None
    for batch in eval_batches(shards, image_size, batch_size, None, bounds):
        picked = _rows(batch, [i for i in range(len(batch["keys"])) if seen + i in keep])
        seen += len(batch["keys"])
        held = picked if held is None else _concat([held, picked])
        while len(held["keys"]) >= batch_size:
            yield _rows(held, range(batch_size))
            held = _rows(held, range(batch_size, len(held["keys"])))
    if held is not None and held["keys"]:
        yield held


def subset_note(shards: str, limit: int | None, seed: int = SUBSET_SEED) -> dict | None:
    """{"samples", "of", "seed"} when ``limit`` draws a subset of the held-out split (None when it is whole)."""
    total = stream.count_samples(shards) if limit is not None else None
    return {"samples": limit, "of": total, "seed": seed} if total is not None and limit < total else None


def _expected_samples(shards: str, limit: int | None) -> int | None:
    """Samples the progress bar expects: the manifest's count, cut to ``limit`` (None when unknown)."""
    _, counts = resolve_shards(shards)
    if counts is None:
        return limit
    return sum(counts) if limit is None else min(sum(counts), limit)


# ---------------------------------------------------------------- the evaluation


def generate_for_shards(captioner: Captioner, shards: str, gen: GenerationConfig | None = None,
                        limit: int | None = None, batch_size: int = 16, progress: bool = True,
                        prompt: str = "") -> dict:
    """{"keys", "captions" (generated), "references" (the stream's pick), "all_references" (every caption of the
    sample), "labels", "skipped"} over the shards (eval transforms)."""
    out: dict = {"keys": [], "captions": [], "references": [], "all_references": [], "labels": [], "skipped": {}}
    bar = tqdm(total=_expected_samples(shards, limit), unit="img", desc="captioning", disable=not progress, mininterval=2.0)
    with bar:
        for batch in heldout_batches(shards, captioner.image_size, batch_size, limit, bounds=captioner.bounds):
            pixels = renormalise(batch["pixel_values"], captioner.mean, captioner.std)
            out["captions"].extend(captioner.caption_pixels(pixels, gen, prompt))
            for name, key in (("keys", "keys"), ("references", "captions"), ("labels", "labels")):
                out[name].extend(batch[key])
            pairs = zip(batch["labels"], batch["captions"], strict=True)
            out["all_references"].extend(_all_captions(lab, ref) for lab, ref in pairs)
            out["skipped"] = dict(batch.get("errors", {}))  # cumulative counts of the (single) reader
            bar.update(len(batch["keys"]))
    if not out["keys"]:
        raise ValueError(f"no samples were read from {shards}; check the shard URL")
    return out


def _all_captions(labels: dict, picked: str) -> list[str]:
    """Every reference caption of a sample: its JSON "captions", else the stream's (txt) caption."""
    captions = labels.get("captions")
    kept = [c for c in captions if isinstance(c, str) and c.strip()] if isinstance(captions, list) else []
    return kept or [picked]


def caption_text_scores(run: dict, baseline_caption: str, meteor: bool = True, device: str = "cpu") -> dict:
    """{"model", "baseline"}: caption_scores of the generated and of the constant captions, all references."""
    references = dict(enumerate(run["all_references"]))
    model = caption_scores(dict(enumerate(run["captions"])), references, meteor=meteor, device=device)
    baseline = caption_scores(dict.fromkeys(references, baseline_caption), references, meteor=meteor, device=device)
    return {"model": model, "baseline": baseline}


def evaluate_export(export_dir: str | Path, shards: str, aus: Sequence[int] = DATASET_AUS["synthetic"],
                    gen: GenerationConfig | None = None, limit: int | None = None, train: TrainingText | None = None,
                    batch_size: int = 16, device: str = "cpu", progress: bool = True, caption_metrics: bool = False,
                    meteor: bool = True, dtype: str = "fp32", task: str = "describe", prompt: str | None = None,
                    captioner: Captioner | None = None) -> dict:
    """Caption the held-out shards with the export; score the model and every baseline.

    ``export_dir`` may also be a run directory (its export/ is used). Returns {"model": scores, "baselines": [rows],
    "best": strongest(baselines), "baseline_source", "samples": the first 20 {key, caption, truth}, "settings",
    "items": every face's {keys, captions, labels}}
    and, with ``caption_metrics``, "captions": {"model", "baseline"} text scores (``meteor=False`` skips METEOR).
    ``task``: which of the export's tasks is asked (its prompt, unless ``prompt`` is given); the model is scored
    on that task's metrics only (TASK_METRICS: both for describe, AU F1 for aus, emotion accuracy for emotion).
    ``limit``: a quick look at a seeded random N of the held-out samples (heldout_batches), recorded in
    ``settings["subset"]`` and named at the top of the report; the whole split otherwise.
    """
    resolve_shards(shards)  # a wrong shard URL fails before the model loads
    captioner = captioner or Captioner.from_export(resolve_export(export_dir), device=device, dtype=dtype)
    prompt = captioner.task_prompt(task) if prompt is None else prompt
    run = generate_for_shards(captioner, shards, gen, limit, batch_size, progress, prompt)
    labels = [_label_fields(lab) for lab in run["labels"]]
    if train is None:
        train = TrainingText(run["references"], labels, "held-out references and labels (optimistic: uses the "
                                                        "test labels; pass the training shards)")
    model = evaluate_captions(run["captions"], labels, aus)
    for metric in METRICS:
        if metric not in TASK_METRICS.get(task, METRICS):  # e.g. the AU task's answers are not asked for emotions
            model[metric] = None
    model["counts"]["skipped"] = run["skipped"]
    baselines = baseline_rows(train, labels, aus)
    samples = [{"key": k, "caption": c, "truth": {"caption": r, **lab}}
               for k, c, r, lab in zip(run["keys"], run["captions"], run["references"], labels, strict=True)]
    settings = {"export": str(export_dir), "shards": shards, "aus": list(aus), "limit": limit,
                "subset": subset_note(shards, limit),
                "generation": dataclasses.asdict(gen or GenerationConfig()), "task": task, "prompt": prompt}
    result = {"model": model, "baselines": baselines, "best": strongest(baselines), "baseline_source": train.source,
              "samples": samples[:SAMPLES_KEPT], "settings": settings,
              # every face's caption and scored labels, for paired intervals between results (expblip.eval.paired)
              "items": {"keys": run["keys"], "captions": run["captions"], "labels": labels}}
    if caption_metrics:
        result["captions"] = caption_text_scores(run, baselines[0]["caption"], meteor, device)
    return result


def _label_fields(labels: dict) -> dict:
    """The scored part of a sample's labels: {"aus", "emotions"} (None where the dataset does not label it), and
    "no_emotion" where the labels say no emotion is right (evaluate_captions)."""
    fields = {"aus": labels.get("aus"), "emotions": labels.get("emotions")}
    return {**fields, "no_emotion": True} if labels.get("no_emotion") else fields


def evaluate_tasks(export_dir: str | Path, shards: str, tasks: Sequence[str] | None = None, device: str = "cpu",
                   dtype: str = "fp32", **kwargs) -> dict[str, dict]:
    """{task: evaluate_export result} for each task the export was trained on (expblip.json "tasks"; ``tasks``
    narrows them), the model loaded once. Each result is scored on its task's metrics beside every baseline."""
    captioner = Captioner.from_export(resolve_export(export_dir), device=device, dtype=dtype)
    asked = list(tasks or captioner.tasks)
    unknown = [t for t in asked if t not in captioner.tasks]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not among the export's {sorted(captioner.tasks)}")
    return {task: evaluate_export(export_dir, shards, task=task, captioner=captioner, **kwargs) for task in asked}
