"""Guards on real data (issue 21): defaults that would silently make real-data numbers wrong are refused or fixed.

Each protocol refusal happens before any fold is evaluated (the exports named here need not exist), and each message
names the manifest, what it says, and the fix. Shards come from a synthetic stand-in laid out like BP4D.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import launch_module

from expblip.data.facs import DATASET_AUS
from expblip.data.shards import read_manifest, resolve_shards
from expblip.data.standin import StandinConfig, write_standin
from expblip.eval import caption_metrics
from expblip.eval.caption_metrics import caption_scores
from expblip.eval.evaluate import evaluate_export
from expblip.eval.job import EvalJob, evaluate
from expblip.eval.probe import run_probes
from expblip.eval.protocol import PROTOCOLS, summarize, summary_table
from expblip.eval.report import report_markdown

FOLDS = (1, 2, 3)


def _make(args: list[str]) -> None:
    assert launch_module("make_shards").main(args) == 0, args


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A BP4D stand-in (41 subjects x 3 frames) and, per fold, good train/test shards (10 samples a shard) plus the
    bad variants the protocol must refuse."""
    tmp = tmp_path_factory.mktemp("guards")
    root = write_standin(StandinConfig("bp4d", str(tmp / "BP4D"), frames=3))
    bp4d = ["bp4d", "--root", str(root), "--folds", "3", "--samples-per-shard", "10"]
    for k in FOLDS:
        _make([*bp4d, "--out", str(tmp / "good" / f"fold{k}" / "test"), "--split", "test", "--fold", str(k),
               "--no-subsample"])
        _make([*bp4d, "--out", str(tmp / "good" / f"fold{k}" / "train"), "--split", "train", "--fold", str(k)])
        _make([*bp4d, "--out", str(tmp / "subsampled" / f"fold{k}" / "test"), "--split", "test", "--fold", str(k),
               "--subsample"])
        _make([*bp4d, "--out", str(tmp / "otherfold" / f"fold{k}" / "test"), "--split", "test",
               "--fold", str(k % 3 + 1), "--no-subsample"])
        _make(["synthetic", "--out", str(tmp / "synthetic" / f"fold{k}" / "test"), "--split", "test",
               "--samples", "12"])
    return {"tmp": tmp, "root": root}


def _protocol(world, shards: str, *extra: str) -> list[str]:
    tmp = world["tmp"]
    return ["--protocol", "bp4d-3fold", "--model", str(tmp / "no-such-run{fold}"), "--shards", shards,
            "--train-shards", str(tmp / "good" / "fold{fold}" / "train"), "--no-progress", *extra]


def _refused(world, capsys, shards: str, *extra: str) -> str:
    """The protocol's one-line error for these test shards (exit 2, before any export is opened)."""
    capsys.readouterr()
    code = launch_module("evaluate").main(_protocol(world, shards, *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no-such-run" not in err, f"the protocol opened an export before checking the shards: {err}"
    return err


# ---------------------------------------------------------------- make_shards: the test split keeps every frame


def test_make_shards_keeps_every_frame_of_the_test_split_by_default(world, tmp_path):
    base = ["bp4d", "--root", str(world["root"]), "--fold", "1", "--folds", "3"]
    _make([*base, "--out", str(tmp_path / "test"), "--split", "test"])
    _make([*base, "--out", str(tmp_path / "train"), "--split", "train"])
    assert read_manifest(str(tmp_path / "test"))["meta"]["subsample"] is False
    assert read_manifest(str(tmp_path / "train"))["meta"]["subsample"] is True  # the paper's training sets
    every = read_manifest(str(world["tmp"] / "good" / "fold1" / "test"))
    assert read_manifest(str(tmp_path / "test"))["total_samples"] == every["total_samples"] == 13 * 3


# ---------------------------------------------------------------- the protocol refuses bad test shards


def test_protocol_refuses_subsampled_test_shards(world, capsys):
    err = _refused(world, capsys, str(world["tmp"] / "subsampled" / "fold{fold}" / "test"))
    manifest = world["tmp"] / "subsampled" / "fold1" / "test" / "manifest.json"
    assert str(manifest) in err and "subsample" in err and "--no-subsample" in err


def test_protocol_refuses_test_shards_of_another_fold(world, capsys):
    err = _refused(world, capsys, str(world["tmp"] / "otherfold" / "fold{fold}" / "test"))
    assert str(world["tmp"] / "otherfold" / "fold1" / "test" / "manifest.json") in err
    assert "fold 2 of 3" in err and "--fold 1 --folds 3" in err


def test_protocol_refuses_test_shards_of_another_dataset(world, capsys):
    err = _refused(world, capsys, str(world["tmp"] / "synthetic" / "fold{fold}" / "test"))
    assert str(world["tmp"] / "synthetic" / "fold1" / "test" / "manifest.json") in err
    assert "synthetic" in err and "make_shards.py bp4d" in err


def test_protocol_refuses_another_split_as_the_test_split(world, capsys):
    err = _refused(world, capsys, str(world["tmp"] / "good" / "fold{fold}" / "train"))
    assert str(world["tmp"] / "good" / "fold1" / "train" / "manifest.json") in err
    assert "'train' split" in err and "--split test" in err


def test_protocol_refuses_aus_that_contradict_its_dataset(world, capsys):
    with pytest.raises(SystemExit):
        launch_module("evaluate").parse_args(_protocol(world, "s/fold{fold}", "--aus", "synthetic"))
    err = capsys.readouterr().err
    assert "--aus synthetic" in err and "bp4d" in err and "drop --aus" in err


def test_evaluate_refuses_aus_that_contradict_the_manifest(world, tiny_run_dir, capsys):
    shards = str(world["tmp"] / "good" / "fold1" / "test")
    code = launch_module("evaluate").main(["--model", str(tiny_run_dir), "--shards", shards, "--aus", "synthetic",
                                           "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--aus synthetic" in err and "bp4d" in err and str(Path(shards) / "manifest.json") in err
    assert "--aus bp4d" in err  # the fix


def test_evaluate_takes_the_aus_from_the_manifest(world, tiny_run_dir):
    job = EvalJob(model=str(tiny_run_dir), shards=str(world["tmp"] / "good" / "fold1" / "test"), beams=1,
                  max_new_tokens=3, progress=False, caption_metrics=False)
    result = evaluate(job)
    assert result["settings"]["aus"] == list(DATASET_AUS["bp4d"])  # not the synthetic world's 12
    assert "bp4d" in result["settings"]["aus_source"] and "manifest" in result["settings"]["aus_source"]
    assert sorted(result["model"]["per_au_f1"]) == sorted(DATASET_AUS["bp4d"])


# ---------------------------------------------------------------- limits never cut the test split


def test_protocol_refuses_a_limit_on_the_test_split(world, capsys):
    with pytest.raises(SystemExit):
        launch_module("evaluate").parse_args(_protocol(world, "s/fold{fold}", "--limit", "5"))
    err = capsys.readouterr().err
    assert "--limit" in err and "whole test split" in err


def test_protocol_refuses_test_shards_that_leave_shards_out(world, capsys):
    part = str(world["tmp"] / "good" / "fold{fold}" / "test" / "shard-{000000..000001}.tar")
    err = _refused(world, capsys, part)
    assert "2 of the 4 shards" in err and "whole test split" in err
    assert str(world["tmp"] / "good" / "fold1" / "test") in err  # the fix: pass the directory


def test_limit_outside_the_protocol_is_a_seeded_random_subset_across_subjects(world, tiny_run_dir):
    shards = str(world["tmp"] / "good" / "fold1" / "test")
    urls, _ = resolve_shards(shards)
    import webdataset as wds

    in_order = [(s["__key__"], json.loads(s["json"])["subject"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    kw = {"limit": 10, "batch_size": 4, "progress": False}
    first = evaluate_export(tiny_run_dir, shards, DATASET_AUS["bp4d"], **kw)
    again = evaluate_export(tiny_run_dir, shards, DATASET_AUS["bp4d"], **kw)
    keys = [s["key"] for s in first["samples"]]
    assert len(keys) == 10 and keys == [s["key"] for s in again["samples"]]  # seeded
    assert keys != [k for k, _ in in_order[:10]]  # never the first N (4 whole subjects)
    subjects = {dict(in_order)[k] for k in keys}
    assert len(subjects) > 4
    header = report_markdown(first).split("\n## ")[0]
    assert re.search(r"random 10 of the 39 held-out samples", header) and "seed" in header


def test_probe_limit_cuts_only_the_training_part(tiny_shards, tiny_run_dir):
    au, = run_probes(tiny_run_dir, str(tiny_shards["train"]), str(tiny_shards["test"]), "vit", ("au",), limit=20,
                     batch_size=32)
    assert au["train_samples"] == 20 and au["test_samples"] == 64  # the whole held-out split


# ---------------------------------------------------------------- reference rows: backbone and fold


def _cells(table: str, needle: str) -> list[str]:
    row = next(line for line in table.splitlines() if needle in line)
    return [c.strip() for c in row.strip("|").split("|")]


def test_reference_rows_name_backbone_and_fold():
    aus = list(DATASET_AUS["bp4d"])
    fold = {"model": {"mean_au_f1": 0.5, "per_au_f1": dict.fromkeys(aus, 0.5), "counts": {"au_labelled": 3}},
            "baselines": [{"key": "all_aus", "name": "every AU", "mean_au_f1": 0.4,
                           "per_au_f1": dict.fromkeys(aus, 0.4)}],
            "best": {"mean_au_f1": {"key": "all_aus"}}}
    table = summary_table(summarize(PROTOCOLS["bp4d-3fold"], aus, [fold, fold, fold]))
    header = _cells(table, "| predictor |")
    col = {name: header.index(name) for name in ("fold 1", "fold 2", "fold 3", "mean over folds")}
    swin = _cells(table, "65.5")
    assert "ME-GraphAU" in swin[0] and "Swin-B" in swin[0] and swin[col["mean over folds"]] == "65.5"
    resnet = _cells(table, "64.7")  # ME-GraphAU's other backbone on BP4D, its own row
    assert "ResNet-50" in resnet[0] and resnet[col["mean over folds"]] == "64.7"
    probe = _cells(table, "Q-Former of Exp-BLIP")  # the paper's probes: one split, fold 1's 13 subjects
    assert "ViT-g/14" in probe[0] and probe[col["fold 1"]] == "66.2"
    assert probe[col["mean over folds"]] == probe[col["fold 2"]] == probe[col["fold 3"]] == ""
    disfa = summary_table(summarize(PROTOCOLS["disfa-3fold"], aus, [fold, fold, fold]))
    assert "ResNet-50" in _cells(disfa, "63.1")[0] and "Swin-B" in _cells(disfa, "62.4")[0]


# ---------------------------------------------------------------- the tokenisation fallback is named


def test_report_header_names_the_regex_tokenisation_fallback(monkeypatch):
    preds, refs = {0: "the brows are raised."}, {0: ["The brows are raised.", "Raised brows."]}
    monkeypatch.setattr(caption_metrics, "java_missing", lambda: "java not found on PATH")
    scores = caption_scores(preds, refs, meteor=False, embedding=False)
    result = {"settings": {"export": "runs/x"}, "captions": {"model": scores, "baseline": scores}}
    header = report_markdown(result).split("\n## ")[0]
    assert "regex" in header and "not comparable to the COCO tokeniser" in header
    monkeypatch.undo()
    with_java = caption_scores(preds, refs, meteor=False, embedding=False)
    assert "not comparable" not in report_markdown({"captions": {"model": with_java, "baseline": with_java}})
