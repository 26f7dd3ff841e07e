"""Linear probes: they learn separable features far above the baselines, deterministically, and run on an export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_export
from transformers import Blip2Config

from expblip.data.facs import DATASET_AUS
from expblip.data.shards import write_shards
from expblip.data.synthetic import synthetic_records
from expblip.eval.probe import ProbeConfig, extract_features, run_probe, run_probes, score_probe
from expblip.model.blip2 import ModelConfig, build_model
from expblip.model.tokenizer import train_caption_tokenizer
from expblip.model.weights import export_hf

AUS = (1, 4, 12)
EMOTIONS = ("happiness", "sadness", "surprise")


def _separable(n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Features [n, 16] and labels: each AU is the sign of its own feature, the emotion is the cluster of 3 others."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    emotion = rng.integers(0, 3, size=n)
    x[np.arange(n), 3 + emotion] += 4.0  # cluster centre per class
    labels = [{"aus": [au for j, au in enumerate(AUS) if x[i, j] > 0.3], "emotions": [EMOTIONS[emotion[i]]]}
              for i in range(n)]
    labels[0] = {"aus": None, "emotions": None}  # an unlabelled sample: skipped and counted, not an error
    return x, labels


@pytest.mark.parametrize("cfg", [ProbeConfig(), ProbeConfig(optimizer="adam", steps=60, lr=0.05, batch_size=32)],
                         ids=["lbfgs", "adam"])
def test_probe_on_separable_features_beats_baselines_and_is_deterministic(cfg):
    train_x, train_labels = _separable(300, seed=1)
    test_x, test_labels = _separable(200, seed=2)
    au = score_probe(train_x, train_labels, test_x, test_labels, "au", AUS, cfg)
    emotion = score_probe(train_x, train_labels, test_x, test_labels, "emotion", AUS, cfg)
    assert au["metric"] == "mean_au_f1" and set(au["per_au_f1"]) == set(AUS)
    assert au["score"] > 0.9 and au["score"] > au["baseline"]["score"] + 0.3
    assert emotion["metric"] == "accuracy" and emotion["classes"] == ["happiness", "sadness", "surprise"]
    assert emotion["score"] > 0.95 and emotion["chance"] == pytest.approx(1 / 3)
    assert emotion["score"] > emotion["baseline"]["score"] + 0.5 and emotion["baseline"]["score"] < 0.5
    assert au["train_samples"] == 299 and au["skipped"] == {"train": 1, "test": 1}
    again = score_probe(train_x, train_labels, test_x, test_labels, "au", AUS, cfg)
    assert again == au  # same numbers, same loss: nothing random is left in the probe


def test_probe_errors_name_the_missing_labels():
    x, labels = _separable(20, seed=0)
    no_emotions = [{"aus": lab["aus"], "emotions": None} for lab in labels]
    with pytest.raises(ValueError, match="emotion probe needs"):
        score_probe(x, no_emotions, x, labels, "emotion")
    with pytest.raises(ValueError, match="no AU-labelled test samples"):
        score_probe(x, labels, x, [{"aus": None}] * 20, "au", AUS)
    with pytest.raises(ValueError, match="task must be"):
        score_probe(x, labels, x, labels, "valence")  # type: ignore[arg-type]


# ---------------------------------------------------------------- on a tiny random export


@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    export = make_tiny_export(root / "export")
    write_shards(synthetic_records(48, seed=0), str(root / "train"), samples_per_shard=24, progress=False)
    write_shards(synthetic_records(16, seed=0, split="test"), str(root / "test"), samples_per_shard=16,
                 progress=False)
    return {"export": root / "export", "train": str(root / "train"), "test": str(root / "test"),
            "config": Blip2Config.from_pretrained(export)}


def test_features_have_the_stated_pooling(export_and_shards):
    cfg, export, test = export_and_shards["config"], export_and_shards["export"], export_and_shards["test"]
    vit, labels = extract_features(export, test, "vit", batch_size=8)
    assert vit.shape == (16, cfg.vision_config.hidden_size) and vit.dtype == np.float32 and len(labels) == 16
    mean, _ = extract_features(export, test, "qformer", "mean", limit=5)
    concat, _ = extract_features(export, test, "qformer", "concat", limit=5)
    queries = cfg.num_query_tokens
    assert mean.shape == (5, cfg.qformer_config.hidden_size) and concat.shape == (5, queries * mean.shape[1])
    # mean pooling is the mean of the concatenated query outputs
    assert np.allclose(concat.reshape(5, queries, -1).mean(axis=1), mean, atol=1e-5)


def test_run_probe_on_tiny_export_scores_baselines_from_the_labels(export_and_shards):
    e = export_and_shards
    au = run_probe(e["export"], e["train"], e["test"], "vit", "au")
    assert au["features"] == "vit" and au["pooling"] == "patch mean" and au["task"] == "au"
    assert au["train_samples"] == 48 and au["test_samples"] == 16 and len(au["per_au_f1"]) == 12
    # all-positive: F1 = 2p / (1 + p) for an AU of held-out prevalence p, 0 for one that never occurs
    test = [r["labels"] for r in synthetic_records(16, seed=0, split="test")]
    aus = DATASET_AUS["synthetic"]
    prevalence = {a: sum(a in lab["aus"] for lab in test) / len(test) for a in aus}
    expected = {a: 2 * p / (1 + p) for a, p in prevalence.items()}
    assert au["baseline"]["per_au_f1"] == pytest.approx(expected)
    assert au["baseline"]["score"] == pytest.approx(sum(expected.values()) / len(aus))
    both = run_probes(e["export"], e["train"], e["test"], "qformer", ("au", "emotion"), batch_size=16)
    assert [p["task"] for p in both] == ["au", "emotion"] and both[0]["pooling"] == "query mean"
    emotion = both[1]
    train = [r["labels"] for r in synthetic_records(48, seed=0)]
    classes = sorted({lab["emotions"][0] for lab in train if lab["emotions"] and len(lab["emotions"]) == 1})
    assert sorted(emotion["classes"]) == classes and emotion["chance"] == pytest.approx(1 / len(classes))
    single = [lab["emotions"][0] for lab in test if lab["emotions"] and len(lab["emotions"]) == 1
              and lab["emotions"][0] in classes]
    majority = emotion["baseline"]["name"].split("(")[1].rstrip(")")
    assert emotion["baseline"]["score"] == pytest.approx(single.count(majority) / len(single))
    assert emotion["test_samples"] == len(single) and emotion["test_samples"] + emotion["skipped"]["test"] == 16
    assert run_probe(e["export"], e["train"], e["test"], "vit", "au") == au  # deterministic end to end


# ---------------------------------------------------------------- on a tiny model trained on the synthetic world


def _train_vision(model, shards: str, steps: int) -> None:
    """The demo's 'vision' stage in plain PyTorch (recipes/tiny_vision.yaml: lr 2e-3, batch 32, no random crop):
    the tiny ViT learns to see the world's AUs."""
    from expblip.data.stream import StreamConfig, make_loader
    from expblip.model.blip2 import VisionPretrainModel, au_targets
    from expblip.pixels import normalise

    aus = DATASET_AUS["synthetic"]
    unit = VisionPretrainModel(model, len(aus))
    opt = torch.optim.AdamW(list(model.vision_model.parameters()) + list(unit.head.parameters()), lr=2e-3)
    cfg = StreamConfig(shards=shards, batch_size=32, seed=0, crop_scale=1.0)
    batches = iter(make_loader(cfg, rank=0, world_size=1))
    for _ in range(steps):
        batch = next(batches)
        loss = unit(normalise(batch["pixel_values"]), **au_targets(batch["labels"], aus))
        opt.zero_grad()
        loss.backward()
        opt.step()


STEPS = 600


@pytest.mark.slow
def test_probe_on_the_trained_synthetic_world_model_beats_all_positive_and_the_random_vit(tmp_path, capsys):
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    write_shards(synthetic_records(1200, seed=0), train, samples_per_shard=600, progress=False)
    write_shards(synthetic_records(200, seed=0, split="test"), test, samples_per_shard=200, progress=False)
    captions = [c for r in synthetic_records(40, seed=1) for c in r["captions"]]
    tokenizer = train_caption_tokenizer(captions, vocab_size=300)
    results = {}
    for steps in (0, STEPS):  # the random tiny ViT, and the same ViT after the demo's 'vision' stage
        torch.manual_seed(0)
        model = build_model(ModelConfig(), tokenizer)
        _train_vision(model, train, steps)
        export_hf(model.state_dict(), model.config, tokenizer, tmp_path / f"export{steps}")
        results[steps] = run_probes(tmp_path / f"export{steps}", train, test, "vit", ("au", "emotion"), batch_size=64)
    (au0, emotion0), (au, emotion) = results[0], results[STEPS]
    with capsys.disabled():
        print(f"\nlinear probe on the trained tiny ViT ({STEPS} steps): mean AU F1 {au['score']:.3f} (all-positive "
              f"{au['baseline']['score']:.3f}, random ViT {au0['score']:.3f}); emotion accuracy "
              f"{emotion['score']:.3f} (majority {emotion['baseline']['score']:.3f}, chance {emotion['chance']:.3f}, "
              f"random ViT {emotion0['score']:.3f})")
    assert au["score"] > au["baseline"]["score"] + 0.15  # the strongest free baseline, by a real margin
    assert au["score"] > au0["score"] + 0.2
    assert emotion["score"] > max(emotion["baseline"]["score"], emotion["chance"], emotion0["score"]) + 0.15
