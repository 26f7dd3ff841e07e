"""Held-out evaluation of an export: generate captions, parse them into AUs and emotions, score against the labels.

    result = evaluate_export("runs/stage2/export", "demo/shards/test", baseline_captions=training_captions(TRAIN),
                             caption_metrics=True)
    write_report(result, "runs/stage2/eval")          # metrics.json + report.md + plots (expblip.eval.report)
    print(summary_line(result))   # held-out mean AU F1: 0.612 (constant-caption baseline: 0.143)

Scoring follows expblip.eval.metrics: per-AU binary F1 (zero_division=0, every AU in ``aus`` stays in the mean)
over the samples whose dataset labels AUs (``labels["aus"]`` is a list, possibly empty), and emotion accuracy over
the samples that carry at least one emotion label (with the confusion matrix of the single-emotion samples).
With ``caption_metrics`` the generated captions are also scored as text against all reference captions of each
image (expblip.eval.caption_metrics: BLEU, METEOR, ROUGE-L, CIDEr, best-over-references and embedding similarity).

The baseline is the *constant caption*: the single most frequent training caption (ties: the first seen), predicted
for every held-out image and scored exactly like the model. It is what a captioner that ignores the image can
reach, so a model must beat it to show that it reads faces. Without training captions, the most frequent held-out
reference caption stands in; that uses the test labels and is an optimistic (harder to beat) baseline, and the
result says so under ``baseline.caption_source``.

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from expblip.data import stream
from expblip.data.facs import DATASET_AUS, EMOTIONS
from expblip.data.shards import resolve_shards
from expblip.eval.caption_metrics import caption_scores
from expblip.eval.metrics import au_f1, emotion_accuracy, emotion_confusion
from expblip.eval.parse import parse_caption
from expblip.eval.report import au_table, summary_line, write_report  # noqa: F401 - the report lives in report.py
from expblip.model.blip2 import GenerationConfig
from expblip.serve.captioner import Captioner, resolve_export

SAMPLES_KEPT = 20  # examples stored in the result and the report


# ---------------------------------------------------------------- scoring captions


def evaluate_captions(captions: Sequence[str], labels: Sequence[dict], aus: Sequence[int]) -> dict:
    """Score captions against per-sample labels ``{"aus": list | None, "emotions": list | None}``.

    Returns {"mean_au_f1", "per_au_f1" {au: f1}, "emotion_accuracy", "counts"}; a score is None when no sample
    carries that kind of label.
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
    counts = {"samples": len(captions), "au_labelled": len(au_rows), "emotion_labelled": len(emo_rows),
              "nothing_parsed": sum(not p["aus"] and not p["emotions"] for p in parsed),
              "names_aus": sum(bool(p["aus"]) for p in parsed), "names_emotion": sum(bool(p["emotions"]) for p in parsed),
              "names_both": sum(bool(p["aus"] and p["emotions"]) for p in parsed)}
    return {"mean_au_f1": f1["mean"] if f1 else None, "per_au_f1": f1["per_au"] if f1 else {},
            "emotion_accuracy": accuracy, "emotion_confusion": confusion, "counts": counts}


def confusion_of(truth: Sequence[set[str]], pred: Sequence[set[str]]) -> dict | None:
    """{"classes", "matrix" [true][predicted, last column "none"]} over the single-emotion samples (None if none)."""
    seen = {next(iter(t)) for t in truth if len(t) == 1}
    classes = [e for e in EMOTIONS if e in seen] + sorted(seen - set(EMOTIONS))
    if not classes:
        return None
    return {"classes": classes, "matrix": emotion_confusion(truth, pred, classes).tolist()}


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The most frequent caption (ties: the one seen first); surrounding whitespace is ignored."""
    if not captions:
        raise ValueError("no captions to pick a constant baseline from; pass training captions")
    return Counter(c.strip() for c in captions).most_common(1)[0][0]


def constant_caption_baseline(train_captions: Sequence[str], labels: Sequence[dict], aus: Sequence[int]) -> dict:
    """The most frequent training caption predicted for every sample, scored like the model (+ "caption")."""
    caption = most_frequent_caption(train_captions)
    return {"caption": caption, **evaluate_captions([caption] * len(labels), labels, aus)}


# ---------------------------------------------------------------- reading shards


def training_captions(shards: str, limit: int | None = None, lowercase: bool = True) -> list[str]:
    """Every caption of a shard spec, read from the JSON/txt members without decoding an image.

    Lower-cased by default, as the stream lower-cases the captions a model trains on.
    """
    urls, _ = resolve_shards(shards)
    errors = stream.ErrorCounter.unlimited()  # skipped samples are counted and logged
    captions: list[str] = []
    for url in urls:
        for raw in stream.read_shard(url, errors):
            try:
                captions.extend(stream.sample_captions(stream.parse_labels(raw), raw))
            except Exception as bad:  # the stream's skip signal: bad JSON or no caption
                errors.add(getattr(bad, "kind", "bad_json"), url, f"{raw['__key__']}: {bad}")
            if limit is not None and len(captions) >= limit:
                return [c.lower() if lowercase else c for c in captions[:limit]]
    if not captions:
        raise ValueError(f"no captions could be read from {shards} (skipped: {errors.counts}); check the shard URL")
    return [c.lower() if lowercase else c for c in captions]


def renormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Stream pixels are CLIP-normalised; re-normalise [B,3,S,S] to an export that uses another mean/std."""
    if tuple(mean) == tuple(stream.CLIP_MEAN) and tuple(std) == tuple(stream.CLIP_STD):
        return pixels

    def col(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=pixels.dtype).view(1, 3, 1, 1)

    return (pixels * col(stream.CLIP_STD) + col(stream.CLIP_MEAN) - col(mean)) / col(std)


def eval_batches(shards: str, image_size: int, batch_size: int, limit: int | None) -> Iterator[dict]:
    """Eval-transform batches of the shards, cut to ``limit`` samples in all."""
    cfg = stream.StreamConfig(shards=shards, train=False, batch_size=batch_size, image_size=image_size, shuffle_buffer=0)
    seen = 0
    for batch in stream.iterate_once(cfg):
        take = len(batch["keys"]) if limit is None else min(len(batch["keys"]), limit - seen)
        if take < len(batch["keys"]):
            batch = {k: v[:take] if k in ("pixel_values", "captions", "labels", "keys") else v for k, v in batch.items()}
        yield batch
        seen += take
        if limit is not None and seen >= limit:
            return


def _expected_samples(shards: str, limit: int | None) -> int | None:
    """Samples the progress bar expects: the manifest's count, cut to ``limit`` (None when unknown)."""
    _, counts = resolve_shards(shards)
    if counts is None:
        return limit
    return sum(counts) if limit is None else min(sum(counts), limit)


# ---------------------------------------------------------------- the evaluation


def generate_for_shards(captioner: Captioner, shards: str, gen: GenerationConfig | None = None,
                        limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """{"keys", "captions" (generated), "references" (the stream's pick), "all_references" (every caption of the
    sample), "labels", "skipped"} over the shards (eval transforms)."""
    out: dict = {"keys": [], "captions": [], "references": [], "all_references": [], "labels": [], "skipped": {}}
    bar = tqdm(total=_expected_samples(shards, limit), unit="img", desc="captioning", disable=not progress, mininterval=2.0)
    with bar:
        for batch in eval_batches(shards, captioner.image_size, batch_size, limit):
            pixels = renormalise(batch["pixel_values"], captioner.mean, captioner.std)
            out["captions"].extend(captioner.caption_pixels(pixels, gen))
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
                    gen: GenerationConfig | None = None, limit: int | None = None,
                    baseline_captions: Sequence[str] | None = None, batch_size: int = 16, device: str = "cpu",
                    progress: bool = True, caption_metrics: bool = False, meteor: bool = True) -> dict:
    """Caption the held-out shards with the export and score model and constant-caption baseline.

    ``export_dir`` may also be a run directory (its export/ is used). Returns {"model": scores, "baseline": scores +
    caption + caption_source, "samples": the first 20 {key, caption, truth}, "settings"} and, with
    ``caption_metrics``, "captions": {"model", "baseline"} text scores (``meteor=False`` skips METEOR's JVM).
    """
    resolve_shards(shards)  # a wrong shard URL fails before the model loads
    captioner = Captioner.from_export(resolve_export(export_dir), device=device)
    run = generate_for_shards(captioner, shards, gen, limit, batch_size, progress)
    labels = [_label_fields(lab) for lab in run["labels"]]
    source = "train" if baseline_captions else "held-out references (optimistic: uses the test labels)"
    baseline = constant_caption_baseline(list(baseline_captions or run["references"]), labels, aus)
    model = evaluate_captions(run["captions"], labels, aus)
    model["counts"]["skipped"] = run["skipped"]
    samples = [{"key": k, "caption": c, "truth": {"caption": r, **lab}}
               for k, c, r, lab in zip(run["keys"], run["captions"], run["references"], labels, strict=True)]
    settings = {"export": str(export_dir), "shards": shards, "aus": list(aus), "limit": limit,
                "generation": dataclasses.asdict(gen or GenerationConfig())}
    result = {"model": model, "baseline": {**baseline, "caption_source": source},
              "samples": samples[:SAMPLES_KEPT], "settings": settings}
    if caption_metrics:
        result["captions"] = caption_text_scores(run, baseline["caption"], meteor, device)
    return result


def _label_fields(labels: dict) -> dict:
    """The scored part of a sample's labels: {"aus", "emotions"} (None where the dataset does not label it)."""
    return {"aus": labels.get("aus"), "emotions": labels.get("emotions")}
