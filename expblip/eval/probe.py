"""Linear probes, as the paper (EXPBLIP.md, evaluation point 2): one linear layer trained on frozen features.

    result = run_probe("runs/au_blip", "shards/bp4d/train", "shards/bp4d/test", features="qformer", task="au",
                       aus=DATASET_AUS["bp4d"])
    result["score"], result["baseline"]["score"]   # mean AU F1 of the probe and of the best constant prediction

Features, extracted once from an export with the eval transforms (no augmentation), in float32:
- ``vit``: the vision tower's last hidden state (after its final LayerNorm, what the Q-Former attends to),
  mean-pooled over the patch tokens (the class token is left out): [N, vision hidden].
- ``qformer``: the Q-Former's outputs for the learned query tokens, before the projection into the language
  model: [N, queries, qformer hidden], pooled by ``pooling="mean"`` over the queries (the default: [N, 768] for
  BLIP-2) or ``"concat"`` (flattened: [N, 32 * 768] for BLIP-2). The paper does not say which it used.
  ``pooling`` applies to the Q-Former only; results name the pooling used ("patch mean", "query mean", ...).

Targets come from the shards' JSON labels: ``task="au"`` is multi-label over ``aus`` (samples whose ``aus`` is a
list, possibly empty; BCE loss; per-AU F1 at probability 0.5 via ``metrics.au_f1``), ``task="emotion"`` is
single-label (samples with exactly one emotion; cross-entropy; accuracy via ``metrics.emotion_accuracy``).
Samples outside the task are counted under ``skipped``.

The probe is deterministic: features are standardised with the training mean and std, the layer starts at zero,
and training is full-batch L-BFGS (default) or Adam over mini-batches shuffled by a seeded generator, with an L2
penalty on the weights. Baselines read no image: for AUs the all-positive prediction (the best constant predictor
under F1), for emotions the majority training class (plus ``chance`` = 1 / classes).

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from expblip.data.facs import DATASET_AUS, EMOTIONS
from expblip.eval.evaluate import eval_batches, renormalise
from expblip.eval.metrics import au_f1, emotion_accuracy
from expblip.infer.captioner import Captioner, resolve_export

Features = Literal["vit", "qformer"]
Task = Literal["au", "emotion"]
Pooling = Literal["mean", "concat"]


@dataclass
class ProbeConfig:
    """How the linear layer is trained."""

    optimizer: Literal["lbfgs", "adam"] = "lbfgs"  # full-batch L-BFGS, or Adam
    steps: int = 200  # L-BFGS iterations, or Adam epochs
    lr: float = 1.0  # 1.0 suits L-BFGS with line search; use ~1e-2 for Adam
    weight_decay: float = 1e-3  # L2 penalty on the weights (not the bias), added to the mean loss
    batch_size: int | None = None  # Adam mini-batch size (None: full batch); L-BFGS is always full-batch
    seed: int = 0  # mini-batch order

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("probe steps must be >= 1, lr > 0 and weight_decay >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"probe batch_size must be >= 1 or None, got {self.batch_size}")


# ---------------------------------------------------------------- features


def pooled_features(model, pixel_values: torch.Tensor, features: Features, pooling: Pooling = "mean") -> torch.Tensor:
    """Frozen features of one batch [B, 3, S, S] → [B, D] (see the module docstring for D)."""
    out = model.get_image_features(pixel_values=pixel_values)
    if features == "vit":
        return out.last_hidden_state[:, 1:].mean(dim=1)  # [B, 1 + patches, Dv] → patch mean [B, Dv]
    queries = out.qformer_outputs.last_hidden_state  # [B, Q, Dq]
    return queries.mean(dim=1) if pooling == "mean" else queries.flatten(1)


@torch.no_grad()
def extract_features(export: str | Path, shards: str, features: Features, pooling: Pooling = "mean",
                     batch_size: int = 32, limit: int | None = None, device: str = "cpu",
                     progress: bool = False, captioner: Captioner | None = None) -> tuple[np.ndarray, list[dict]]:
    """(features float32 [N, D], labels of each sample) over the shards, eval transforms, in shard order."""
    if features not in ("vit", "qformer") or pooling not in ("mean", "concat"):
        raise ValueError(f"features must be 'vit' or 'qformer' and pooling 'mean' or 'concat', got {features!r}, "
                         f"{pooling!r}")
    cap = captioner or Captioner.from_export(resolve_export(export), device=device)
    rows: list[np.ndarray] = []
    labels: list[dict] = []
    for batch in tqdm(eval_batches(shards, cap.image_size, batch_size, limit), desc=f"{features} features",
                      unit="batch", disable=not progress):
        pixels = renormalise(batch["pixel_values"], cap.mean, cap.std).to(cap.device)
        rows.append(pooled_features(cap.model, pixels, features, pooling).float().cpu().numpy())
        labels.extend(batch["labels"])
    if not rows:
        raise ValueError(f"no samples were read from {shards}; check the shard URL")
    return np.concatenate(rows), labels


# ---------------------------------------------------------------- targets


def au_targets(labels: Sequence[dict], aus: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of AU-labelled samples, 0/1 targets [rows, len(aus)])."""
    rows = np.array([i for i, lab in enumerate(labels) if isinstance(lab.get("aus"), list)], dtype=np.int64)
    targets = np.array([[float(au in labels[i]["aus"]) for au in aus] for i in rows], dtype=np.float32)
    return rows, targets.reshape(len(rows), len(aus))


def emotion_classes(labels: Sequence[dict]) -> list[str]:
    """The single emotions of the samples, in EMOTIONS order (others after, sorted)."""
    seen = {lab["emotions"][0] for lab in labels if _single_emotion(lab)}
    return [e for e in EMOTIONS if e in seen] + sorted(seen - set(EMOTIONS))


def emotion_targets(labels: Sequence[dict], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of single-emotion samples, class index per row; -1 for a class not in ``classes``)."""
    index = {c: i for i, c in enumerate(classes)}
    rows = np.array([i for i, lab in enumerate(labels) if _single_emotion(lab)], dtype=np.int64)
    return rows, np.array([index.get(labels[i]["emotions"][0], -1) for i in rows], dtype=np.int64)


def _single_emotion(labels: dict) -> bool:
    emotions = labels.get("emotions")
    return isinstance(emotions, list) and len(emotions) == 1


# ---------------------------------------------------------------- the linear layer


def _penalised_loss(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, task: Task, weight_decay: float):
    logits = layer(x)
    loss = (nn.functional.binary_cross_entropy_with_logits(logits, y) if task == "au"
            else nn.functional.cross_entropy(logits, y))
    return loss + weight_decay * layer.weight.pow(2).sum()


def _fit_lbfgs(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, task: Task, cfg: ProbeConfig) -> None:
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=cfg.lr, max_iter=cfg.steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _penalised_loss(layer, x, y, task, cfg.weight_decay)
        loss.backward()
        return loss

    optimizer.step(closure)


def _fit_adam(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, task: Task, cfg: ProbeConfig) -> None:
    optimizer = torch.optim.Adam(layer.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = cfg.batch_size or len(x)
    for _ in range(cfg.steps):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), size):
            rows = order[start : start + size]
            optimizer.zero_grad()
            _penalised_loss(layer, x[rows], y[rows], task, cfg.weight_decay).backward()
            optimizer.step()


@dataclass
class LinearProbe:
    """A trained probe: standardisation statistics + the linear layer."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    layer: nn.Linear  # D → outputs (AUs or classes)
    task: Task
    train_loss: float

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.layer((torch.from_numpy(x).float() - self.mean) / self.std).numpy()


def fit_probe(x: np.ndarray, y: np.ndarray, task: Task, outputs: int, cfg: ProbeConfig | None = None) -> LinearProbe:
    """Train one linear layer on features x [N, D]: y is 0/1 [N, outputs] (au) or class indices [N] (emotion)."""
    cfg = cfg or ProbeConfig()
    if len(x) == 0:
        raise ValueError(f"no training samples for the {task} probe; check that the shards carry {task} labels")
    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
    mean, std = xt.mean(dim=0), xt.std(dim=0, unbiased=False).clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.from_numpy(y).float() if task == "au" else torch.from_numpy(y).long()
    layer = nn.Linear(xt.shape[1], outputs)
    nn.init.zeros_(layer.weight)  # a convex problem: zero start is deterministic and costs nothing
    nn.init.zeros_(layer.bias)
    with torch.enable_grad():
        (_fit_lbfgs if cfg.optimizer == "lbfgs" else _fit_adam)(layer, xt, yt, task, cfg)
        loss = float(_penalised_loss(layer, xt, yt, task, cfg.weight_decay).detach())
    return LinearProbe(mean, std, layer.requires_grad_(False), task, loss)


# ---------------------------------------------------------------- scoring


def score_au_probe(train_x: np.ndarray, train_labels: Sequence[dict], test_x: np.ndarray,
                   test_labels: Sequence[dict], aus: Sequence[int], cfg: ProbeConfig | None = None) -> dict:
    """Fit on the training features, score per-AU F1 (threshold 0.5) on the test features, plus the baseline."""
    train_rows, train_y = au_targets(train_labels, aus)
    test_rows, test_y = au_targets(test_labels, aus)
    if not len(test_rows):
        raise ValueError("no AU-labelled test samples for the au probe")
    probe = fit_probe(train_x[train_rows], train_y, "au", len(aus), cfg)
    hits = probe.logits(test_x[test_rows]) > 0.0  # sigmoid(logit) > 0.5
    truth = [{au for au, t in zip(aus, row, strict=True) if t} for row in test_y]
    pred = [{au for au, h in zip(aus, row, strict=True) if h} for row in hits]
    model, baseline = au_f1(truth, pred, aus), au_f1(truth, [set(aus)] * len(truth), aus)
    return {"metric": "mean_au_f1", "score": model["mean"], "per_au_f1": model["per_au"],
            "baseline": {"name": "all-positive (best constant prediction under F1)", "score": baseline["mean"],
                         "per_au_f1": baseline["per_au"]},
            "train_samples": len(train_rows), "test_samples": len(test_rows), "outputs": len(aus),
            "train_loss": probe.train_loss,
            "skipped": {"train": len(train_labels) - len(train_rows), "test": len(test_labels) - len(test_rows)}}


def score_emotion_probe(train_x: np.ndarray, train_labels: Sequence[dict], test_x: np.ndarray,
                        test_labels: Sequence[dict], cfg: ProbeConfig | None = None) -> dict:
    """Fit a classifier over the training emotions, score accuracy on the test features, plus the baselines."""
    classes = emotion_classes(train_labels)
    train_rows, train_y = emotion_targets(train_labels, classes)
    test_rows, _ = emotion_targets(test_labels, classes)
    if len(classes) < 2 or not len(test_rows):
        raise ValueError(f"the emotion probe needs >= 2 training classes and single-emotion test samples; got "
                         f"classes {classes} and {len(test_rows)} test samples")
    probe = fit_probe(train_x[train_rows], train_y, "emotion", len(classes), cfg)
    guesses = probe.logits(test_x[test_rows]).argmax(axis=1)
    truth = [set(test_labels[i]["emotions"]) for i in test_rows]
    majority = Counter(classes[c] for c in train_y).most_common(1)[0][0]
    return {"metric": "accuracy", "score": emotion_accuracy(truth, [{classes[g]} for g in guesses]),
            "classes": classes, "chance": 1.0 / len(classes),
            "baseline": {"name": f"majority class ({majority})",
                         "score": emotion_accuracy(truth, [{majority}] * len(truth))},
            "train_samples": len(train_rows), "test_samples": len(test_rows), "outputs": len(classes),
            "train_loss": probe.train_loss,
            "skipped": {"train": len(train_labels) - len(train_rows), "test": len(test_labels) - len(test_rows)}}


def score_probe(train_x: np.ndarray, train_labels: Sequence[dict], test_x: np.ndarray, test_labels: Sequence[dict],
                task: Task, aus: Sequence[int] = DATASET_AUS["synthetic"], cfg: ProbeConfig | None = None) -> dict:
    """The probe result for one task on already extracted features (see ``run_probe`` for the fields)."""
    if task == "au":
        return {"task": task, **score_au_probe(train_x, train_labels, test_x, test_labels, aus, cfg)}
    if task == "emotion":
        return {"task": task, **score_emotion_probe(train_x, train_labels, test_x, test_labels, cfg)}
    raise ValueError(f"task must be 'au' or 'emotion', got {task!r}")


# ---------------------------------------------------------------- the probe of an export


def run_probes(export: str | Path, train_shards: str, test_shards: str, features: Features,
               tasks: Sequence[Task] = ("au", "emotion"), aus: Sequence[int] = DATASET_AUS["synthetic"],
               pooling: Pooling = "mean", cfg: ProbeConfig | None = None, batch_size: int = 32,
               limit: int | None = None, device: str = "cpu", progress: bool = False,
               skip_unlabelled: bool = False, dtype: str = "fp32") -> list[dict]:
    """Extract features once, then one probe per task; with ``skip_unlabelled`` a task without labels is reported
    as {"task", "features", "skipped_reason"} instead of raising. ``limit`` cuts only the training split (its first
    N samples); the test split is always scored whole."""
    cap = Captioner.from_export(resolve_export(export), device=device, dtype=dtype)
    train_x, train_labels = extract_features(export, train_shards, features, pooling, batch_size, limit, device,
                                             progress, cap)
    test_x, test_labels = extract_features(export, test_shards, features, pooling, batch_size, None, device,
                                           progress, cap)
    pooled = "patch mean" if features == "vit" else f"query {pooling}"
    meta = {"features": features, "pooling": pooled, "dim": int(train_x.shape[1]),
            "settings": {"export": str(export), "train_shards": train_shards, "test_shards": test_shards,
                         "train_limit": limit, "probe": dataclasses.asdict(cfg or ProbeConfig())}}
    results = []
    for task in tasks:
        try:
            results.append({**meta, **score_probe(train_x, train_labels, test_x, test_labels, task, aus, cfg)})
        except ValueError as err:
            if not skip_unlabelled:
                raise
            results.append({**meta, "task": task, "skipped_reason": str(err)})
    return results


def run_probe(export: str | Path, train_shards: str, test_shards: str, features: Features, task: Task,
              aus: Sequence[int] = DATASET_AUS["synthetic"], pooling: Pooling = "mean",
              cfg: ProbeConfig | None = None, batch_size: int = 32, limit: int | None = None,
              device: str = "cpu", progress: bool = False) -> dict:
    """A linear probe of ``features`` for ``task``, trained on ``train_shards`` and scored on ``test_shards``.

    Returns {"task", "features", "pooling", "dim", "metric" ("mean_au_f1" | "accuracy"), "score", "baseline"
    {"name", "score", ...}, "train_samples", "test_samples", "skipped", "train_loss", "settings"} plus
    "per_au_f1" (au) or "classes" and "chance" (emotion). ``limit`` cuts the training split to its first N samples;
    the test split is always whole.
    """
    return run_probes(export, train_shards, test_shards, features, (task,), aus, pooling, cfg, batch_size, limit,
                      device, progress)[0]
