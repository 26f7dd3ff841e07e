"""Task prompts: one model trained on several instructions at once, each answered from the sample's labels.

    tasks = TasksConfig(describe=TaskSpec(1.0), aus=TaskSpec(1.0), emotion=TaskSpec(1.0))   # config key `tasks`
    name = pick_task(tasks, labels, key="face-01", seed=0, step=12)    # 'aus', weighted by the mixture
    prompt, answer = task_text(tasks, name, labels, caption)           # ('List the active action units.',
                                                                       #  'inner brow raiser, lip corner puller')

Tasks and their answers (the evaluator parses each back into labels, expblip.infer.parse):
- describe: the sample's caption, after the describe prompt ('' by default: the paper's captioning, no instruction);
- aus: the FACS names of the labelled AUs in AU order, ', '-joined ('none' when no AU is active);
- emotion: the labelled emotion(s) ('happiness'; 'happiness and surprise' for a compound label).
A task applies only to samples that carry its labels (aus: labels["aus"] is a list; emotion: a non-empty
labels["emotions"]); each sample draws one applicable task with the mixture's weights, from a hash of (seed, sample
key, step): the same draw on every rank, after a resume and at any world size. The prompt text is the instruction;
the LM family's turn layout around it is the model's (expblip.model.family). A sample from instruction data carries
its own instruction (labels["prompt"], its caption the answer; ``sample_text``) and draws no task.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from expblip.data.facs import AUS

TaskName = Literal["describe", "aus", "emotion"]
TASKS: tuple[TaskName, ...] = ("describe", "aus", "emotion")


DEFAULT_PROMPTS = {"describe": "", "aus": "List the active action units.", "emotion": "Name the emotion."}


@dataclass
class TaskSpec:
    """One instruction: its share of the training mixture and its prompt."""

    weight: float = 0.0  # relative share among the tasks a sample can train (0 = not trained)
    prompt: str | None = None  # the instruction ('' = none; None = the task's default, DEFAULT_PROMPTS)


@dataclass
class TasksConfig:
    """The task mixture of a run (the recipe sets the weights; the prompts are what evaluation and serving ask)."""

    describe: TaskSpec = field(default_factory=lambda: TaskSpec(1.0))
    aus: TaskSpec = field(default_factory=TaskSpec)
    emotion: TaskSpec = field(default_factory=TaskSpec)

    def __post_init__(self) -> None:
        for name in TASKS:
            if self.spec(name).prompt is None:
                self.spec(name).prompt = DEFAULT_PROMPTS[name]
        if any(self.spec(t).weight < 0 for t in TASKS) or not any(self.spec(t).weight > 0 for t in TASKS):
            raise ValueError("tasks.*.weight must be >= 0 with at least one task above 0")
        prompts = [self.spec(t).prompt for t in self.trained]
        if len(set(prompts)) < len(prompts):
            raise ValueError(f"two trained tasks share one prompt ({prompts}); give each task its own tasks.*.prompt")

    def spec(self, name: str) -> TaskSpec:
        return getattr(self, name)

    @property
    def trained(self) -> list[str]:
        return [t for t in TASKS if self.spec(t).weight > 0]

    @property
    def multi(self) -> bool:
        """More than the paper's single captioning task."""
        return self.trained != ["describe"] or bool(self.describe.prompt)

    def prompts(self) -> dict[str, str]:
        """{task: prompt} of the trained tasks (what an export records for evaluation and serving)."""
        return {t: self.spec(t).prompt for t in self.trained}


def applies(name: str, labels: dict) -> bool:
    """Whether a sample's labels can answer task `name`."""
    if name == "aus":
        return labels.get("aus") is not None
    if name == "emotion":
        return bool(labels.get("emotions"))
    return True


def pick_task(tasks: TasksConfig, labels: dict, key: str, seed: int, step: int) -> str:
    """One applicable task for a sample, drawn with the mixture's weights from a hash of (seed, key, step)."""
    options = [(t, tasks.spec(t).weight) for t in tasks.trained if applies(t, labels)]
    if not options:
        return "describe"
    digest = hashlib.sha256(f"{seed}|{key}|{step}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(w for _, w in options)
    for name, weight in options:
        point -= weight
        if point < 0:
            return name
    return options[-1][0]


def au_answer(aus: list[int]) -> str:
    """The AU task's answer: FACS names in AU order ('none' for no active AU)."""
    return ", ".join(AUS[a].name for a in sorted(aus)) or "none"


def emotion_answer(emotions: list[str]) -> str:
    return " and ".join(sorted(emotions))


def task_text(tasks: TasksConfig, name: str, labels: dict, caption: str) -> tuple[str, str]:
    """(prompt, answer) of task `name` for one sample."""
    answer = {"describe": lambda: caption, "aus": lambda: au_answer(labels["aus"]),
              "emotion": lambda: emotion_answer(labels["emotions"])}[name]()
    return tasks.spec(name).prompt, answer


def sample_text(tasks: TasksConfig, labels: dict, key: str, seed: int, step: int, caption: str) -> tuple[str, str]:
    """(prompt, answer) a sample trains on: its own instruction where it carries one (labels["prompt"]: instruction
    data, expblip.data.sources.llava; its caption is the answer), else the task drawn for (seed, key, step)."""
    if labels.get("prompt") is not None:
        return labels["prompt"], caption
    return task_text(tasks, pick_task(tasks, labels, key, seed, step), labels, caption)


def task_vocabulary(tasks: TasksConfig) -> list[str]:
    """Text a tiny tokenizer is trained on besides the captions: the trained tasks' prompts and every answer word."""
    if not tasks.multi:
        return []
    from expblip.data.facs import EMOTIONS

    return [tasks.spec(t).prompt for t in tasks.trained] + [au_answer(list(AUS)), " and ".join(EMOTIONS), "none"]
