"""Evaluation reports: plots, Markdown tables, metrics.json, MLflow logging into a training run, the CLI end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_module, make_tiny_export
from PIL import Image

from expblip.data.captions import au_caption, concat_fusion, emotion_caption
from expblip.data.shards import write_shards
from expblip.data.synthetic import synthetic_records
from expblip.eval.caption_metrics import caption_scores
from expblip.eval.evaluate import TrainingText, baseline_rows, evaluate_captions, strongest
from expblip.eval.report import eval_metrics, find_mlflow_run, log_to_mlflow, summary_lines, write_report

ROOT = Path(__file__).resolve().parents[1]
AUS = (1, 4, 12, 26)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _caption(labels: dict) -> str:
    """The rule caption of the labels (a relaxed face when nothing is labelled)."""
    if not labels["aus"] and not labels["emotions"]:
        return "The face is relaxed."
    return concat_fusion(au_caption(labels["aus"]), emotion_caption(labels["emotions"] or []))


def _labels_and_captions() -> tuple[list[dict], list[str]]:
    """Eight faces; the 'generated' captions get two of them wrong (AU26 missed, sadness read as happiness)."""
    labels = [{"aus": [12], "emotions": ["happiness"]}, {"aus": [1, 4], "emotions": ["sadness"]},
              {"aus": [26], "emotions": ["surprise"]}, {"aus": [4], "emotions": None},
              {"aus": [12], "emotions": ["happiness"]}, {"aus": [1, 4], "emotions": ["sadness"]},
              {"aus": [1, 26], "emotions": ["surprise"]}, {"aus": [], "emotions": None}]
    generated = [_caption(lab) for lab in labels]
    generated[2] = "The face shows surprise."
    generated[5] = concat_fusion(au_caption([1, 4]), emotion_caption(["happiness"]))
    return labels, generated


@pytest.fixture(scope="module")
def result() -> dict:
    labels, generated = _labels_and_captions()
    references = {i: [_caption(lab), "A face."]
                  for i, lab in enumerate(labels)}
    smile = "It is a people who pulls lip corner."
    probe = {"features": "qformer", "pooling": "query mean", "dim": 32, "task": "au", "metric": "mean_au_f1",
             "score": 0.71, "per_au_f1": {1: 0.7, 4: 0.72}, "baseline": {"name": "all-positive", "score": 0.4},
             "train_samples": 40, "test_samples": 8, "skipped": {"train": 0, "test": 0}, "train_loss": 0.2}
    baselines = baseline_rows(TrainingText([smile], labels), labels, AUS)
    return {"model": evaluate_captions(generated, labels, AUS), "baselines": baselines, "best": strongest(baselines),
            "baseline_source": "train",
            "samples": [{"key": f"k{i}", "caption": c, "truth": {"caption": references[i][0], **lab}}
                        for i, (c, lab) in enumerate(zip(generated, labels, strict=True))],
            "settings": {"export": "runs/x/export", "shards": "shards/test"},
            "captions": {"model": caption_scores(dict(enumerate(generated)), references, meteor=False, embedding=False),
                         "baseline": caption_scores(dict.fromkeys(references, smile), references, meteor=False,
                                                    embedding=False)},
            "probes": [probe, {"features": "vit", "pooling": "patch mean", "task": "emotion",
                               "skipped_reason": "no emotion labels"}]}


def _check_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, path
    with Image.open(path) as img:
        img.load()
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert img.width > 300 and img.height > 200
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20  # not a blank canvas: bars, text, colours


def test_write_report_files_tables_and_plots(result, tmp_path):
    out = write_report(result, tmp_path / "eval")
    assert sorted(p.name for p in out.iterdir()) == ["au_f1.png", "emotion_confusion.png", "metrics.json", "report.md"]
    _check_png(out / "au_f1.png")
    _check_png(out / "emotion_confusion.png")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"]["mean_au_f1"] == pytest.approx(result["model"]["mean_au_f1"])
    assert saved["captions"]["model"]["cider"] == pytest.approx(result["captions"]["model"]["cider"])
    report = (out / "report.md").read_text()
    for expected in ("| AU | model | most frequent training caption | every AU of the training labels | "
                     "majority training emotion (happiness) | chance |", "| 26 |",
                     "| metric | model | most frequent training caption |", "| rouge_l_best |",
                     "| predictor | mean AU F1 | emotion accuracy | caption |",
                     '| every AU of the training labels | 0.',
                     "| true \\ named | happiness | sadness | surprise | several | none |",
                     "| features | pooling | task | metric | probe | baseline | chance |",
                     "| qformer | query mean | au | mean_au_f1 | 0.710 | 0.400 (all-positive)",
                     "skipped: no emotion labels", "![per-AU F1, model vs the best constant caption](au_f1.png)",
                     "![emotion confusion](emotion_confusion.png)", "meteor skipped: not requested",
                     *summary_lines(result)):
        assert expected in report, expected
    # 5 of the 6 emotion faces right; the majority emotion (happiness) is 2 of 6
    assert summary_lines(result)[0] == "held-out emotion accuracy: 0.833 (best constant caption: 0.333)"


def test_emotion_confusion_is_in_the_result_and_the_report(result, tmp_path):
    confusion = result["model"]["emotion_confusion"]
    assert confusion["classes"] == ["happiness", "sadness", "surprise"]  # EMOTIONS order
    assert confusion["columns"] == ["happiness", "sadness", "surprise", "several", "none"]
    # rows: true class; columns: what the caption named. One sadness face was read as happiness.
    assert confusion["matrix"] == [[2, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 2, 0, 0]]
    report = (write_report(result, tmp_path) / "report.md").read_text()
    assert "| sadness | 1 | 1 | 0 | 0 | 0 |" in report


def test_report_without_optional_parts(result, tmp_path):
    bare = {k: v for k, v in result.items() if k not in ("captions", "probes")}
    bare["model"] = {**bare["model"], "emotion_confusion": None}
    out = write_report(bare, tmp_path)
    assert not (out / "emotion_confusion.png").exists() and (out / "au_f1.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Caption metrics" not in report and "## Linear probes" not in report


def test_eval_metrics_are_flat_and_prefixed(result):
    metrics = eval_metrics(result)
    assert metrics["eval.au_f1"] == pytest.approx(result["model"]["mean_au_f1"])
    for b in result["baselines"]:
        assert metrics[f"eval.baseline.{b['key']}.au_f1"] == pytest.approx(b["mean_au_f1"])
    assert metrics["eval.best_baseline.au_f1"] == max(b["mean_au_f1"] for b in result["baselines"])
    assert metrics["eval.best_baseline.emotion_accuracy"] == max(b["emotion_accuracy"] for b in result["baselines"])
    assert metrics["eval.au_f1.au26"] == pytest.approx(result["model"]["per_au_f1"][26])
    assert metrics["eval.rouge_l"] == pytest.approx(result["captions"]["model"]["rouge_l"])
    assert metrics["eval.baseline.most_frequent.cider"] == pytest.approx(result["captions"]["baseline"]["cider"])
    assert metrics["eval.probe.qformer.au_f1"] == 0.71 and metrics["eval.probe.qformer.au_f1.baseline"] == 0.4
    assert "eval.meteor" not in metrics and "eval.embedding_similarity" not in metrics  # skipped: not logged
    assert all(k.startswith("eval.") and isinstance(v, float) for k, v in metrics.items())


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def training_run(tmp_path_factory) -> dict:
    """A finished 'training run' in a SQLite store under tmp_path, as expblip.train.tracking leaves it."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("train", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "loss", 2.5, step=10)
    client.set_terminated(run_id)
    return {"root": root, "uri": uri, "run_id": run_id, "client": client}


def test_log_to_mlflow_attaches_metrics_and_artefacts_to_the_training_run(result, training_run, tmp_path):
    client, run_id = training_run["client"], training_run["run_id"]
    out = write_report(result, tmp_path / "eval")
    assert log_to_mlflow(result, out, training_run["uri"], run_id) == run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["loss"] == 2.5  # the training metrics stay
    assert metrics["eval.au_f1"] == pytest.approx(result["model"]["mean_au_f1"])
    assert metrics["eval.rouge_l_best"] == pytest.approx(result["captions"]["model"]["rouge_l_best"])
    assert client.get_run(run_id).data.tags["eval.shards"] == "shards/test"
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "eval")}
    assert files == {"metrics.json", "report.md", "au_f1.png", "emotion_confusion.png"}
    local = Path(client.download_artifacts(run_id, "eval/report.md", str(tmp_path)))
    assert local.read_text() == (out / "report.md").read_text()


def test_log_to_mlflow_without_run_id_makes_a_new_run_beside_the_store(result, training_run, tmp_path):
    client = training_run["client"]
    out = write_report(result, tmp_path / "eval")
    run_id = log_to_mlflow(result, out, training_run["uri"], experiment="expblip-eval", run_name="eval-only")
    run = client.get_run(run_id)
    assert run_id != training_run["run_id"] and run.info.status == "FINISHED"
    assert run.data.metrics["eval.best_baseline.au_f1"] == pytest.approx(result["best"]["mean_au_f1"]["score"])
    assert client.get_experiment(run.info.experiment_id).name == "expblip-eval"
    assert run.info.artifact_uri.startswith((training_run["root"] / "mlartifacts").as_uri())


def test_find_mlflow_run_from_run_dir_or_export(tmp_path):
    (tmp_path / "export").mkdir()
    assert find_mlflow_run(tmp_path) is None
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"run_id": "abc", "tracking_uri": "sqlite:///x.db"}))
    expected = {"run_id": "abc", "tracking_uri": "sqlite:///x.db"}
    assert find_mlflow_run(tmp_path) == expected and find_mlflow_run(tmp_path / "export") == expected


# ---------------------------------------------------------------- the CLI end to end




def test_evaluate_cli_probes_caption_metrics_and_mlflow(training_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_tiny_export(run_dir / "export")
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": training_run["run_id"],
                                                         "tracking_uri": training_run["uri"]}))
    write_shards(synthetic_records(24, seed=0), str(tmp_path / "train"), samples_per_shard=24, progress=False)
    write_shards(synthetic_records(6, seed=0, split="test"), str(tmp_path / "test"), samples_per_shard=6,
                 progress=False)
    code = launch_module("evaluate").main(["--model", str(run_dir), "--shards", str(tmp_path / "test"), "--beams", "2",
                                     "--max-new-tokens", "4", "--no-progress", "--no-meteor", "--probe", "vit",
                                     "--probe-task", "au", "--probe-train-shards", str(tmp_path / "train"),
                                     "--mlflow", "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.fullmatch(r"held-out mean AU F1: \d\.\d{3} \(best constant caption: \d\.\d{3}\)",
                        out.strip().splitlines()[-1])
    assert "| rouge_l_best |" in out and "| vit | patch mean | au | mean_au_f1 |" in out
    assert f"mlflow run: {training_run['run_id']}" in out
    metrics = training_run["client"].get_run(training_run["run_id"]).data.metrics
    assert {"eval.probe.vit.au_f1", "eval.embedding_similarity", "eval.bleu_4", "eval.au_f1"} <= set(metrics)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["captions"]["model"]["images"] == 6 and saved["probes"][0]["train_samples"] == 24


def test_evaluate_cli_refuses_probe_without_training_shards(capsys):
    with pytest.raises(SystemExit):
        launch_module("evaluate").parse_args(["--model", "m", "--shards", "s", "--probe", "vit"])
    assert "--probe-train-shards" in capsys.readouterr().err
