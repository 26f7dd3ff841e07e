"""The field's protocol: subject-exclusive folds from the cited lists, and launch/evaluate.py --protocol end to end on
a synthetic stand-in laid out like BP4D."""

from __future__ import annotations

import json
import re

import pytest
import webdataset as wds
from conftest import launch_module, make_tiny_export

from expblip.data.shards import read_manifest, resolve_shards
from expblip.data.sources import records
from expblip.data.sources.folds import BP4D_PARTS, DISFA_PARTS, fold_test_subjects
from expblip.data.standin import StandinConfig, write_standin
from expblip.eval.job import EvalJob
from expblip.eval.protocol import PROTOCOLS, check_job, summarize

# The lists as JAA-Net and ME-GraphAU publish them (tool/BP4D_image_label_process.py, DISFA_image_label_process.py),
# typed out again here so that a change to expblip's copy cannot pass unnoticed.
CITED_BP4D = ["F001 M007 F018 F008 F002 M004 F010 F009 M012 M001 F016 M014 F023 M008",
              "M011 F003 M010 M002 F005 F022 M018 M017 F013 M016 F020 F011 M013 M005",
              "F007 F015 F006 F019 M006 M009 F012 M003 F004 F021 F017 M015 F014"]
CITED_DISFA = ["SN002 SN010 SN001 SN026 SN027 SN032 SN030 SN009 SN016",
               "SN013 SN018 SN011 SN028 SN012 SN006 SN031 SN021 SN024",
               "SN003 SN029 SN023 SN025 SN008 SN005 SN007 SN017 SN004"]


def _subjects(shards) -> set[str]:
    urls, _ = resolve_shards(str(shards))
    return {json.loads(s["json"])["subject"] for s in wds.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(scope="module")
def bp4d_standin(tmp_path_factory):
    """All 41 BP4D subjects of the published folds, 3 frames each, laid out as the release (AU_OCC + 2D+3D)."""
    return write_standin(StandinConfig("bp4d", str(tmp_path_factory.mktemp("standin") / "BP4D"), frames=3))


def test_folds_match_the_cited_lists_disjoint_and_covering():
    for parts, cited in ((BP4D_PARTS, CITED_BP4D), (DISFA_PARTS, CITED_DISFA)):
        assert [list(p) for p in parts] == [c.split() for c in cited]
    for dataset, parts, n in (("bp4d", BP4D_PARTS, 41), ("disfa", DISFA_PARTS, 27)):
        everyone = {s for p in parts for s in p}
        tests = [fold_test_subjects(dataset, k, 3, everyone) for k in (1, 2, 3)]
        assert len(everyone) == n and set().union(*tests) == everyone
        assert all(not a & b for i, a in enumerate(tests) for b in tests[i + 1:])
        assert tests == [set(parts[2]), set(parts[1]), set(parts[0])]  # ME-GraphAU: fold K tests part 4-K


def test_other_datasets_and_fold_counts_partition_by_the_seeded_rule():
    videos = [f"{g:03d}{seat}" for g in range(1, 9) for seat in "AB"]
    tests = [fold_test_subjects("gft", k, 4, videos, seed=1) for k in range(1, 5)]
    assert set().union(*tests) == set(videos) and sum(map(len, tests)) == len(videos)
    assert [len(t) for t in tests] == [4, 4, 4, 4]
    assert tests == [fold_test_subjects("gft", k, 4, reversed(videos), seed=1) for k in range(1, 5)]
    with pytest.raises(ValueError, match=r"\['F999'\] are in no published fold"):
        fold_test_subjects("bp4d", 1, 3, ["F001", "F999"])


def test_make_shards_folds_are_subject_exclusive_and_cover_bp4d(bp4d_standin, tmp_path):
    main = launch_module("make_shards").main
    tests, trains = [], []
    for k in (1, 2, 3):
        for split, seen in (("test", tests), ("train", trains)):
            out = tmp_path / f"fold{k}" / split
            assert main(["bp4d", "--root", str(bp4d_standin), "--out", str(out), "--split", split, "--fold", str(k),
                         "--folds", "3", "--no-subsample"]) == 0
            seen.append(_subjects(out))
    everyone = {s for p in BP4D_PARTS for s in p}
    assert set().union(*tests) == everyone and all(not a & b for i, a in enumerate(tests) for b in tests[i + 1:])
    assert [t | r for t, r in zip(tests, trains, strict=True)] == [everyone] * 3
    assert all(not t & r for t, r in zip(tests, trains, strict=True))
    assert tests[0] == set(CITED_BP4D[2].split())  # fold 1 = JAA-Net part 3 = the paper's 13 BP4D test subjects
    manifest = read_manifest(str(tmp_path / "fold1" / "test"))
    assert manifest["total_samples"] == 13 * 3 and manifest["meta"]["fold"] == 1 and manifest["meta"]["folds"] == 3
    paper = {r["labels"]["subject"] for r in records("bp4d", root=str(bp4d_standin), split="test",
                                                     test_subjects=",".join(BP4D_PARTS[2]))}
    assert paper == tests[0]
    assert main(["bp4d", "--root", str(bp4d_standin), "--out", str(tmp_path / "paper"), "--split", "test",
                 "--paper-split", "--no-subsample"]) == 0
    assert _subjects(tmp_path / "paper") == tests[0]


def test_validation_subjects_are_carved_out_of_a_folds_training_part_seeded_and_recorded(bp4d_standin, tmp_path):
    """--split val --val-fraction F: a seeded share of fold 1's training subjects; --split train with the same F
    leaves exactly them out, so train, val and test are subject-exclusive and together the whole dataset."""
    main = launch_module("make_shards").main
    common = ["bp4d", "--root", str(bp4d_standin), "--fold", "1", "--folds", "3", "--no-subsample"]
    got = {}
    for split, extra in (("train", ["--val-fraction", "0.2"]), ("val", ["--val-fraction", "0.2"]), ("test", []),
                         ("whole", [])):
        out = tmp_path / split
        assert main([*common, "--out", str(out), "--split", "train" if split == "whole" else split, *extra]) == 0
        got[split] = _subjects(out)
    assert got["val"] and not got["val"] & got["train"] and not got["val"] & got["test"]
    assert got["val"] | got["train"] == got["whole"] and not got["whole"] & got["test"]
    assert 0.05 < len(got["val"]) / len(got["whole"]) < 0.4  # about 0.2 of 28 subjects, by a seeded hash
    meta = read_manifest(str(tmp_path / "val"))["meta"]
    assert meta["split"] == "val" and meta["fold"] == 1 and meta["validation"]["fraction"] == 0.2
    assert main([*common, "--out", str(tmp_path / "val7"), "--split", "val", "--val-fraction", "0.2",
                 "--split-seed", "7"]) == 0
    assert _subjects(tmp_path / "val7") != got["val"]  # another seed, other subjects


def test_disfa_paper_split_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"14,535 images = 3 subjects x 4,845 frames\) names no subjects"):
        from expblip.data.sources.convert import ConvertRequest, source_options

        source_options(ConvertRequest("disfa", out=str(tmp_path), paper_split=True))


def test_protocol_job_needs_a_fold_placeholder_and_the_protocols_aus():
    with pytest.raises(ValueError, match=r"put \{fold\} in --model, --shards"):
        check_job(EvalJob(model="runs/a", shards="shards/test", protocol="bp4d-3fold"))
    with pytest.raises(ValueError, match="scores the disfa8 AUs"):
        check_job(EvalJob(model="r{fold}", shards="s{fold}", aus="bp4d", protocol="disfa-3fold"))
    with pytest.raises(SystemExit):
        launch_module("evaluate").parse_args(["--model", "m", "--shards", "s", "--protocol", "bp4d-3fold"])


def test_summary_averages_folds_per_au_beside_the_strongest_baseline():
    aus = [1, 2]

    def fold(model, base):
        return {"model": {"mean_au_f1": sum(model) / 2, "per_au_f1": dict(zip(aus, model, strict=True)),
                          "counts": {"au_labelled": 10}},
                "baselines": [{"key": "all_aus", "name": "every AU", "mean_au_f1": sum(base) / 2,
                               "per_au_f1": dict(zip(aus, base, strict=True))}],
                "best": {"mean_au_f1": {"key": "all_aus"}}}

    summary = summarize(PROTOCOLS["bp4d-3fold"], aus, [fold([0.5, 0.7], [0.2, 0.4]), fold([0.3, 0.1], [0.4, 0.2])])
    assert summary["mean"]["model"]["per_au"] == pytest.approx({1: 0.4, 2: 0.4})
    assert summary["mean"]["model"]["mean"] == pytest.approx(0.4)
    assert summary["mean"]["baseline"]["mean"] == pytest.approx(0.3)


def test_evaluate_protocol_bp4d_3fold_end_to_end(bp4d_standin, tmp_path, capsys):
    """The protocol on a stand-in laid out like BP4D: fold shards by make_shards, one (random, tiny) export per fold,
    the per-fold table printed with the strongest baseline and ME-GraphAU's and the paper's reference numbers
    (about 12 s on 2 CPU cores)."""
    make_shards = launch_module("make_shards").main
    for k in (1, 2, 3):
        make_tiny_export(tmp_path / f"run{k}" / "export", seed=k)
        for split in ("train", "test"):
            assert make_shards(["bp4d", "--root", str(bp4d_standin), "--out", str(tmp_path / f"fold{k}" / split),
                                "--split", split, "--fold", str(k), "--folds", "3", "--no-subsample"]) == 0
    capsys.readouterr()
    code = launch_module("evaluate").main([
        "--protocol", "bp4d-3fold", "--model", str(tmp_path / "run{fold}"),
        "--shards", str(tmp_path / "fold{fold}/test"),
        "--train-shards", str(tmp_path / "fold{fold}/train"), "--probe", "qformer", "--probe-task", "au",
        "--probe-train-shards", str(tmp_path / "fold{fold}/train"), "--beams", "1", "--max-new-tokens", "4",
        "--no-progress", "--no-caption-metrics", "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert code == 0, out
    aus = " | ".join(f"AU{a}" for a in (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24))
    assert f"| predictor | fold | {aus} | mean |" in out
    for k in ("1", "2", "3", "mean"):
        assert re.search(rf"\| text-parsed captions \| {k} \|( \d+\.\d \|){{12}} \*\*\d+\.\d\*\* \|", out)
        assert re.search(rf"\| linear probe: qformer \| {k} \|", out)
    assert re.search(r"\| text-parsed captions \(this export\) \|( \d+\.\d \|){3} \*\*\d+\.\d\*\* \| \d+\.\d \(", out)
    # each reference names its backbone and stands in the column of what it averages (issue 21): ME-GraphAU's
    # 3-fold mean under the mean, the paper's single-split probes under fold 1
    assert ("| reference: ME-GraphAU (Luo et al., IJCAI 2022), real BP4D; backbone Swin-B; mean over 3 folds "
            "|  |  |  | 65.5 |  |") in out
    assert ("| reference linear probe: Q-Former of Exp-BLIP (paper); backbone EVA-CLIP ViT-g/14; one split: fold 1's "
            "test subjects | 66.2 |  |  |  |  |") in out
    assert re.fullmatch(r"bp4d-3fold: mean AU F1 over 3 folds: \d+\.\d \(strongest free baseline: \d+\.\d\)",
                        out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "eval" / "protocol.json").read_text())
    assert [f["samples"] for f in summary["folds"]] == [13 * 3, 14 * 3, 14 * 3]  # each fold's test subjects x frames
    assert (tmp_path / "eval" / "fold2" / "metrics.json").is_file()
