"""Seeds (issue 21): a pipeline seed changes every stage's initialisation and data order, never the world; the
summary over seeds gives mean ± SD and a verdict only where every seed's interval agrees."""

from __future__ import annotations

import pytest
from conftest import launch_module

from expblip.eval.intervals import MET, NOT_RESOLVED
from expblip.pipeline.chain import Chain, stage_config
from expblip.pipeline.recipe import load_recipe
from expblip.pipeline.seeds import summarise


def test_a_seed_sets_every_stages_initialisation_and_data_order_not_the_world(tmp_path):
    for seed in (0, 2):
        p = load_recipe("exp_blip", [f"out={tmp_path}", f"train.seed={seed}"])
        cfg = stage_config(Chain(p, tmp_path), "au_blip", p.train.stage2, "shards", "", tmp_path / "run")
        assert (cfg.train.seed, cfg.data.train.seed, p.world.seed) == (seed, seed, 0)


def _result(f1: float, acc: float, low: float, high: float, verdict: str) -> dict:
    interval = {"estimate": f1 - 0.4, "low": low, "high": high}
    return {"rows": [{"model": "Exp-BLIP", "mean_au_f1": f1, "emotion_accuracy": acc, "names_both": 0.9,
                      "emotion_false_positive_rate": 0.1}],
            "comparisons": [{"comparison": "Exp-BLIP − strongest baseline (all AUs)", "metric": "mean_au_f1",
                             "interval": interval, "verdict": verdict}]}


def test_summary_gives_mean_and_sd_and_a_verdict_only_where_every_seed_agrees():
    both = summarise([_result(0.80, 0.6, 0.30, 0.50, MET), _result(0.84, 0.7, 0.35, 0.52, MET)])
    assert both["models"]["Exp-BLIP"]["mean_au_f1"] == [0.80, 0.84]
    assert "| Exp-BLIP | 0.820 ± 0.028 | 0.650 ± 0.071 |" in both["table"]
    assert both["comparisons"][0]["verdict"] == MET and "[+0.300, +0.500], [+0.350, +0.520]" in both["table"]
    split = summarise([_result(0.80, 0.6, 0.30, 0.50, MET), _result(0.45, 0.7, -0.02, 0.12, NOT_RESOLVED)])
    assert split["comparisons"][0]["verdict"] == NOT_RESOLVED


def test_seeds_apply_to_pipeline_recipes_only(capsys):
    main = launch_module("pipeline").main
    for argv in (["--recipe", "demo", "--seeds", "3"], ["--recipe", "exp_blip", "--seeds", "0"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "--seeds" in capsys.readouterr().err
