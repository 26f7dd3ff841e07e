"""Task prompts: the mixture's draw, the answers, and (slow) one model trained on three instructions at once that
answers the AU prompt with AU names and the emotion prompt with one emotion, each scored by the strict evaluator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from expblip.config import ConfigError, load_config
from expblip.data.facs import AUS
from expblip.data.tasks import TasksConfig, TaskSpec, au_answer, pick_task, task_text
from expblip.infer.parse import parse_caption

REPO = Path(__file__).resolve().parents[1]
THREE = ["tasks.describe.weight=1", "tasks.aus.weight=1", "tasks.emotion.weight=1"]


def test_the_mixture_draws_each_task_by_weight_the_same_way_every_time():
    tasks = TasksConfig(describe=TaskSpec(1.0), aus=TaskSpec(2.0), emotion=TaskSpec(1.0))
    labels = {"aus": [1, 12], "emotions": ["happiness"]}
    draws = [pick_task(tasks, labels, key=f"face-{i}", seed=0, step=3) for i in range(4000)]
    share = Counter(draws)
    assert share["aus"] / len(draws) == pytest.approx(0.5, abs=0.03)  # weight 2 of 4
    assert share["describe"] / len(draws) == pytest.approx(0.25, abs=0.03)
    assert draws == [pick_task(tasks, labels, key=f"face-{i}", seed=0, step=3) for i in range(4000)]  # resumable
    assert draws != [pick_task(tasks, labels, key=f"face-{i}", seed=0, step=4) for i in range(4000)]  # per step
    # a sample without emotion labels never draws the emotion task
    assert "emotion" not in {pick_task(tasks, {"aus": [4]}, key=f"k{i}", seed=0, step=0) for i in range(200)}


def test_answers_parse_back_into_the_labels_they_were_made_from():
    tasks = TasksConfig(describe=TaskSpec(1.0), aus=TaskSpec(1.0), emotion=TaskSpec(1.0))
    labels = {"aus": [12, 1, 6], "emotions": ["happiness"]}
    prompt, answer = task_text(tasks, "aus", labels, "a caption")
    assert prompt == "List the active action units." and answer == au_answer([1, 6, 12])
    assert parse_caption(answer) == {"aus": [1, 6, 12], "emotions": []}  # AU names only
    prompt, answer = task_text(tasks, "emotion", labels, "a caption")
    assert prompt == "Name the emotion." and parse_caption(answer) == {"aus": [], "emotions": ["happiness"]}
    assert task_text(tasks, "describe", labels, "a caption") == ("", "a caption")


def test_task_config_errors_name_the_key():
    with pytest.raises((ConfigError, ValueError), match="tasks"):
        load_config(None, ["tasks.describe.weight=0"])
    with pytest.raises((ConfigError, ValueError), match="prompt"):
        load_config(None, [*THREE, "tasks.emotion.prompt=List the active action units."])


# ---------------------------------------------------------------- a multi-task model (slow)

STEPS = {"vision": 400, "lm": 300, "stage2": 900}


@pytest.fixture(scope="module")
def multitask_export(tmp_path_factory) -> tuple[Path, dict]:
    """tiny_vision -> tiny_lm -> tiny_stage2, every stage with the three-task mixture, on 3000 synthetic faces
    (each stage a world of one; ~5-6 min on 2 shared cores)."""
    from expblip.pipeline.chain import launch
    from expblip.pipeline.demo import DemoConfig, make_shards

    out = tmp_path_factory.mktemp("multitask")
    shards = make_shards(DemoConfig(out=str(out), train_samples=3000, test_samples=120))
    weights = ""
    for stage, recipe in (("vision", "tiny_vision"), ("lm", "tiny_lm"), ("stage2", "tiny_stage2")):
        run_dir = out / "runs" / stage
        overrides = [f"data.train.shards={shards['train']}", f"train.run_dir={run_dir}",
                     f"train.max_steps={STEPS[stage]}", f"train.ckpt_every={STEPS[stage]}", "tracking.enabled=false",
                     f"model.weights={weights}", *THREE]
        launch(load_config(REPO / "recipes" / f"{recipe}.yaml", overrides), "local")
        weights = str(run_dir)
    return out / "runs" / "stage2", shards


@pytest.mark.slow  # ~6-8 min: trains the chain above, then captions 120 held-out faces per task
def test_multitask_model_answers_aus_with_au_names_and_emotion_with_one_emotion(multitask_export, monkeypatch):
    """Asserted as rates over all 120 held-out answers of each task, with margins, never on single answers: a
    tiny model's answers move with the CPU's float rounding (on an AVX2-only AMD EPYC one of the 20 kept AU
    answers read "none, brow raiser, ..." where this machine's were all FACS names)."""
    from expblip.eval import evaluate as evaluate_module
    from expblip.eval.evaluate import evaluate_tasks, training_text
    from expblip.model.blip2 import GenerationConfig

    monkeypatch.setattr(evaluate_module, "SAMPLES_KEPT", 10_000)  # keep every answer, not the report's first 20
    run_dir, shards = multitask_export
    results = evaluate_tasks(run_dir, shards["test"], train=training_text(shards["train"]), batch_size=40,
                             gen=GenerationConfig(num_beams=1, max_new_tokens=30), progress=False)
    assert set(results) == {"describe", "aus", "emotion"}
    aus, emotion = results["aus"], results["emotion"]
    n = aus["model"]["counts"]["samples"]
    assert n == emotion["model"]["counts"]["samples"] == len(aus["samples"]) == 120
    au_names = {a.name for a in AUS.values()} | {"none"}
    # an AU answer is a list of FACS names and nothing else: in at least 80 % of answers (measured 112/120 here on
    # 2026-12-04; over 3 training seeds of bench/three_task.py, 300/300, 281/300 and 265/300: 88-100 %, so 80 %
    # leaves 8 points below the worst seed; the other machine's failure was 1 of the 20 kept), and an emotion named
    # in at most 5 % (0/120)
    pure = sum(set(s.strip() for s in sample["caption"].split(",")) <= au_names for sample in aus["samples"])
    print(f"AU answers of FACS names only: {pure}/{n}; naming an emotion: {aus['model']['counts']['names_emotion']}")
    assert pure >= 0.80 * n, [s["caption"] for s in aus["samples"]][:10]
    assert aus["model"]["counts"]["names_emotion"] <= 0.05 * n
    # the emotion answers, through the strict evaluator's confusion matrix: at most 5 % name several emotions
    # (measured 0 of 120) and at most 15 % none (measured 0, 7 and 6 of 120 in three runs)
    confusion = emotion["model"]["emotion_confusion"]
    columns, matrix = confusion["columns"], confusion["matrix"]
    several = sum(row[columns.index("several")] for row in matrix)
    none = sum(row[columns.index("none")] for row in matrix)
    print(f"emotion answers naming several emotions: {several}/{n}, none: {none}/{n}")
    assert several <= 0.05 * n and none <= 0.15 * n, confusion
    # (measured at these steps: about half of the emotion answers trail AU names after the emotion, e.g.
    # 'neutral, lip corner puller': 62 of 120; the strict evaluator scores the one emotion they name)
    # each task scored on its metric by the strict evaluator, above the best constant answer chosen on the
    # training labels by a margin (measured: AU F1 0.568 and 0.594 vs 0.411, accuracy 0.582 twice vs 0.200)
    assert aus["model"]["emotion_accuracy"] is None and emotion["model"]["mean_au_f1"] is None
    au_f1, au_best = aus["model"]["mean_au_f1"], aus["best"]["mean_au_f1"]["score"]
    acc, acc_best = emotion["model"]["emotion_accuracy"], emotion["best"]["emotion_accuracy"]["score"]
    print(f"AU task mean AU F1 {au_f1:.3f} (best constant {au_best:.3f}); emotion task accuracy {acc:.3f} "
          f"(best constant {acc_best:.3f})")
    assert au_f1 > au_best + 0.05 and acc > acc_best + 0.05
