"""Bring your own faces, end to end (issue 22), as docs/own-data.md walks it: a CSV of your own faces →
``make_shards table --check`` → train and test shards → fine-tune an export under the deepspeed launcher (1 CPU rank)
→ ``launch/evaluate.py`` beside the strongest baselines → serve the fine-tuned export and describe one face.

The faces are the synthetic world's (expblip.data.synthetic), saved as PNG files and listed in a table the way a lab
would list its own: something a tiny model can learn, ~100 rows, one step feeding the next."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from conftest import deepspeed_cmd, launch_module, make_tiny_export, read_metrics, run_launcher
from PIL import Image
from test_serve import post_file

from expblip.data.shards import read_manifest, resolve_shards
from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.model.blip2 import GenerationConfig
from expblip.serve.app import app_for_export, background_server

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 64, 24  # faces per split; the table holds one more row: a training face whose file is missing
STEPS = 24


def write_faces_table(root: Path) -> Path:
    """root/faces/*.png and root/faces.csv with columns image, aus, emotion, subject, split (subjects apart between
    the splits). The last training row names an image that is not there."""
    (root / "faces").mkdir(parents=True)
    rows = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for i, rec in enumerate(synthetic_records(n, seed=7, split=split)):
            name = f"faces/{split}_{i:03d}.png"
            rec["image"].save(root / name)
            aus, emotions = rec["labels"]["aus"], rec["labels"]["emotions"]
            rows.append({"image": name, "aus": ",".join(map(str, aus)) or "none",
                         "emotion": emotions[0] if emotions else "", "subject": f"{split}-{i % 4}", "split": split})
    rows.insert(N_TRAIN, {"image": "faces/gone.png", "aus": "12", "emotion": "", "subject": "train-0",
                          "split": "train"})
    with open(root / "faces.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "faces.csv"


def make_shards(argv: list[str]) -> int:
    return launch_module("make_shards").main(argv)


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    return {"root": root, "table": write_faces_table(root / "mine")}


@pytest.fixture(scope="module")
def shards(own) -> dict[str, Path]:
    table = ["table", "--table", str(own["table"]), "--max-skipped", "0.05", "--samples-per-shard", "32"]
    for split in ("train", "test"):
        assert make_shards([*table, "--split", split, "--out", str(own["root"] / "shards" / split)]) == 0
    return {split: own["root"] / "shards" / split for split in ("train", "test")}


@pytest.fixture(scope="module")
def run_dir(own, shards) -> Path:
    """A tiny export whose tokenizer knows the table's captions stands in for a trained one; fine-tuned on the
    training shards for STEPS steps by launch/finetune.py under the deepspeed launcher, one CPU rank, with the recipe
    a tiny-world export is trained with (recipes/tiny_stage2.yaml), as docs/own-data.md runs it."""
    from expblip.data.stream import StreamConfig, iterate_once

    captions = [c for b in iterate_once(StreamConfig(shards=str(shards["train"]))) for c in b["captions"]]
    init = make_tiny_export(own["root"] / "trained" / "export", captions, vocab_size=256)
    run = own["root"] / "runs" / "mine"
    proc = run_launcher(deepspeed_cmd(
        "--deepspeed", "ds_configs/zero3.json", "--config", "recipes/tiny_stage2.yaml",
        f"data.train.shards={shards['train']}", f"model.weights={init}", f"train.run_dir={run}",
        "data.train.batch_size=8", "optim.lr=3e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2",
        f"train.max_steps={STEPS}", "train.log_every=1", "train.ckpt_every=0", "tracking.experiment=own-faces",
        ranks=1), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


# ---------------------------------------------------------------- the path, step by step


def test_check_counts_the_table_and_writes_nothing(own, capsys):
    table = ["table", "--table", str(own["table"])]
    assert make_shards([*table, "--check"]) == 2  # 1 missing image of 65 rows is over the default 1%
    out, err = capsys.readouterr()
    assert f"{N_TRAIN} usable of {N_TRAIN + 1} rows read" in out and "  missing image: 1\n" in out
    assert "faces/gone.png" in out + err and "--max-skipped" in err
    assert make_shards([*table, "--check", "--max-skipped", "0.05"]) == 0
    out = capsys.readouterr().out
    examples = [line for line in out.splitlines() if line.startswith("  example")]
    assert len(examples) == 3 and "key=table-faces_train_000" in examples[0]
    assert make_shards([*table, "--check", "--split", "test"]) == 0
    assert f"{N_TEST} usable of {N_TEST} rows read" in capsys.readouterr().out
    assert sorted(p.name for p in own["table"].parent.iterdir()) == ["faces", "faces.csv"]  # nothing written


def test_train_and_test_shards_hold_their_rows(shards):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        manifest = read_manifest(str(shards[split]))
        assert manifest["total_samples"] == n and manifest["meta"]["source"] == "table"
        assert manifest["meta"]["split"] == split
        assert len(resolve_shards(str(shards[split]))[0]) == -(-n // 32)


def test_finetune_from_the_export_learns_and_exports(run_dir):
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    meta = json.loads((run_dir / "export" / "expblip.json").read_text())
    assert meta["step"] == STEPS and (run_dir / "export" / "config.json").is_file()


def test_evaluate_puts_the_model_beside_the_strongest_baselines(run_dir, shards, capsys):
    out_dir = run_dir / "eval"
    code = launch_module("evaluate").main([
        "--model", str(run_dir), "--shards", str(shards["test"]), "--train-shards", str(shards["train"]),
        "--out", str(out_dir), "--beams", "1", "--max-new-tokens", "24", "--batch-size", "24", "--no-meteor",
        "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert re.fullmatch(r"held-out mean AU F1: \d\.\d{3} \(best constant caption: \d\.\d{3}\)", out[-1])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["model"]["counts"]["samples"] == N_TEST and metrics["baseline_source"] == "train"
    assert [b["key"] for b in metrics["baselines"]] == ["most_frequent", "all_aus", "majority_emotion", "chance"]
    settings = metrics["settings"]  # a table names no fixed AU set: the synthetic world's, and the report says why
    assert settings["aus_set"] == "synthetic" and "says table: your own labels" in settings["aus_source"]
    report = (out_dir / "report.md").read_text()
    for row in ("| AU | model | most frequent training caption | every AU of the training labels |", "| chance |"):
        assert row in report, row


def test_serve_the_fine_tuned_export_and_describe_a_face(run_dir, own):
    """launch/serve.py's own app (its options, app_for_export) on the run directory, under a real server."""
    serve = launch_module("serve")
    opts = serve.options(serve.parse_args(["--model", str(run_dir), "--beams", "2", "--max-new-tokens", "24"]))
    face = (own["table"].parent / "faces" / "test_000.png").read_bytes()
    with background_server(app_for_export(opts)) as url:
        status, body = post_file(f"{url}/describe", face)
    assert status == 200, body
    assert isinstance(body["caption"], str) and body["caption"].strip()
    assert body["image"] == {"width": 64, "height": 64}
    image, gen = Image.open(io.BytesIO(face)).convert("RGB"), GenerationConfig(num_beams=2, max_new_tokens=24)
    fine_tuned, started = (Captioner.from_export(path).describe([image], gen)[0]["caption"]
                           for path in (run_dir / "export", own["root"] / "trained" / "export"))
    assert body["caption"] == fine_tuned != started  # the fine-tuned export is served, not the one it started from
