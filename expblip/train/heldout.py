"""Held-out evaluation during training, every ``train.eval_every`` steps on ``data.eval``: collective, every rank.

    metrics = evaluate(run, state)   # {"eval/loss", "eval/mean_au_f1", "eval/emotion_accuracy", ...} on rank 0

- **Loss**: every rank scores ``train.eval_batches`` batches of its share of the held-out shards (the stream pads
  each rank's share, so every rank takes the same number of forward passes and no rank waits alone in a
  collective); the sums are all-reduced into one mean over the samples.
- **Captions** (``train.eval_generate`` > 0, caption stages): every rank captions the same number of held-out
  images with greedy decoding (``synced_gpus`` under ZeRO-3, where every rank must step ``generate`` together); rank
  0 gathers them and scores them with the evaluator (strict emotion rule), beside the best constant caption chosen
  on the training labels (``eval/best_constant.*``, logged once).
- **Best step**: the step with the lowest held-out loss so far (``eval/best_loss``, ``eval/best_step``); kept in the
  checkpoint, so a resumed run continues the comparison. With ``train.keep=best`` that step is checkpointed when it
  is found, its checkpoint outlives pruning, and the export holds its weights (the default exports the last step).
- **Validation only**: what selects must not be what is reported. ``data.eval`` shards whose manifest says
  ``test``, ``all`` or ``train`` are refused before the run starts (:func:`selection_split`) unless
  ``train.eval_on_test=true``; the split is tagged (``eval.split``) and recorded in the export's ``selection``.
The same fixed held-out batches are used at every evaluation (eval transforms, no shuffling): curves are comparable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from expblip.config import ConfigError
from expblip.data.stream import make_loader
from expblip.log import get_logger
from expblip.pixels import normalise_batch, to_device
from expblip.train import comm
from expblip.train.engine import gathered, whole_model, whole_model_fits

log = get_logger(__name__)
TRAINING_LABELS_READ = 20_000  # training samples the constant baselines are chosen on (labels only, no images)
CAPTION_STAGES = ("stage2",)


SELECTABLE = ("val", "unknown")  # manifest splits held-out evaluation may select on (unknown: no manifest)


def selection_split(cfg) -> str:
    """The split ``data.eval``'s manifest names (``val``, ``test``, ...; ``unknown`` when the shards have none).
    Raises ConfigError for test, all or train shards unless ``train.eval_on_test``: the step they select (and, with
    train.keep=best, the export) would be chosen on the faces that are reported, or on the faces trained on."""
    from expblip.eval.provenance import shard_info

    info = shard_info(cfg.data.eval.shards)
    split = str((info.meta if info else {}).get("split") or "unknown")
    if split in SELECTABLE or cfg.train.eval_on_test:
        return split
    raise ConfigError(
        f"data.eval.shards={cfg.data.eval.shards} are {split!r} shards (their manifest says split={split}): held-out "
        "evaluation during training selects eval.best_step (and the export with train.keep=best), so it must not "
        "see the faces a number is reported on. Write validation shards (make_shards synthetic --split val, or "
        "--split val --val-fraction F for a dataset: validation subjects carved from the training part) and point "
        "data.eval.shards at them, or set train.eval_on_test=true to tag this run as selected on those faces")


@dataclass
class HeldoutState:
    """What outlives one evaluation: the best step so far and (rank 0) the baselines to print beside the scores."""

    best_step: int = -1
    best_loss: float = float("inf")
    baselines: dict = field(default_factory=dict)  # metric -> {"score", "name"}, filled at the first evaluation
    split: str = ""  # what data.eval's manifest says it is (selection_split), set at setup
    restored_step: int = -1  # train.keep=best: the step whose weights the engine holds again at the end

    def selection(self, cfg) -> dict:
        """What the export records about how its step was chosen."""
        return {"split": self.split, "shards": cfg.data.eval.shards, "metric": "eval/loss", "best_step":
                self.best_step, "best_loss": self.best_loss, "keep": cfg.train.keep}

    def state_dict(self) -> dict:
        return {"best_step": self.best_step, "best_loss": self.best_loss}

    @classmethod
    def from_state_dict(cls, state: dict | None) -> HeldoutState:
        return cls(**(state or {}))


def _eval_stream(run):
    cfg = dataclasses.replace(run.cfg.data.eval, train=False, shuffle_buffer=0)
    return iter(make_loader(cfg, run.rank, run.world, max_outage_s=run.cfg.data.max_outage_s))


@torch.no_grad()
def heldout_loss(run, model_inputs) -> float:
    """Collective: the mean loss over ``eval_batches`` held-out batches of every rank."""
    # summed on the engine's device (no host sync per batch), reduced there: NCCL on GPUs, gloo on CPU ranks
    batches, total = _eval_stream(run), torch.zeros(2, dtype=torch.float64, device=run.engine.device)
    for _ in range(run.cfg.train.eval_batches):
        batch = next(batches)
        out = run.engine(**model_inputs(run, batch, task_step=-1))
        loss = out["loss"] if isinstance(out, dict) else out
        total[0] += loss.detach().double() * len(batch["keys"])
        total[1] += len(batch["keys"])
    comm.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def heldout_captions(run, prompt: str = "") -> tuple[list[str], list[dict]]:
    """Collective: greedy captions (answers to `prompt`) of the same number of held-out images on every rank; all of
    them on rank 0."""
    from expblip.model.generation import GenerationConfig
    from expblip.model.spec import spec_for_preset

    spec = spec_for_preset(run.cfg.model.preset)
    hf = spec.hf_model(run.engine.module)
    gen = GenerationConfig(num_beams=1, max_new_tokens=run.cfg.train.eval_max_new_tokens)
    per_rank = -(-run.cfg.train.eval_generate // run.world)  # ceil: every rank runs the same number of batches
    batches, captions, labels = _eval_stream(run), [], []
    dtype = torch.bfloat16 if run.engine.bfloat16_enabled() else torch.float32  # as the loop feeds the engine
    with generation_weights(run) as whole:
        partitioned = not whole and any(hasattr(p, "ds_id") for p in hf.parameters())
        external = spec.read_outside_forward(hf) if partitioned else []
        while len(captions) < per_rank:
            batch = next(batches)
            pixels = normalise_batch(to_device(batch["pixel_values"], run.engine.device, non_blocking=True), dtype)
            with gathered(external):  # parameters generate() reads outside any module's forward: gather them
                captions += spec.generate(hf, run.tokenizer, spec.pixel_inputs(hf.config, pixels), gen, prompt,
                                          synced_gpus=partitioned and run.world > 1)
            labels += batch["labels"]
    gathered_all = comm.all_gather_object((captions[:per_rank], labels[:per_rank]))
    return [c for part in gathered_all for c in part[0]], [lab for part in gathered_all for lab in part[1]]


def generation_weights(run):
    """Collective: the context held-out captions are generated in. Under ZeRO-3 (train.eval_gather) the whole model
    is gathered once for the evaluation where it fits, instead of ZeRO-3 all-gathering every layer at every token;
    elsewhere, and with eval_gather=never, the engine's own partitions (synced_gpus)."""
    mode = run.cfg.train.eval_gather
    partitioned = any(hasattr(p, "ds_id") for p in run.engine.module.parameters())
    enabled = partitioned and (mode == "always" or (mode == "auto" and whole_model_fits(run.engine.module,
                                                                                         run.engine.device)))
    return whole_model(run.engine, enabled)


def _baselines(run) -> dict:
    """Rank 0: the training text the constant captions are chosen on (the first samples' labels and captions) and
    the AUs to score: ``train.eval_aus``, else every AU those training labels show."""
    from expblip.eval.evaluate import training_text

    train = training_text(run.cfg.data.train.shards, limit=TRAINING_LABELS_READ)
    seen = sorted({a for lab in train.labels for a in lab.get("aus") or []})
    return {"train": train, "aus": list(run.cfg.train.eval_aus) or seen}


TASK_METRICS = {"describe": ("mean_au_f1", "emotion_accuracy"), "aus": ("mean_au_f1",),
                "emotion": ("emotion_accuracy",)}


def caption_scores(run, state: HeldoutState, captions: list[str], labels: list[dict], task: str = "describe") -> dict:
    """Rank 0: evaluator scores of the held-out captions (answers to `task`'s prompt: its metrics, under
    eval/<task>/ except for describe), beside the best constant captions (first time only)."""
    from expblip.eval.evaluate import baseline_rows, evaluate_captions, strongest

    if not state.baselines:
        state.baselines = _baselines(run)
    scored = [{"aus": lab.get("aus"), "emotions": lab.get("emotions")} for lab in labels]
    if not state.baselines["aus"]:  # an emotion-only dataset: no AU to score
        scored = [{**lab, "aus": None} for lab in scored]
    model = evaluate_captions(captions, scored, state.baselines["aus"])
    prefix = "eval/" if task == "describe" else f"eval/{task}/"
    metrics = {f"{prefix}{k}": model[k] for k in TASK_METRICS[task] if model[k] is not None}
    metrics[f"{prefix}captions"] = len(captions)
    best = strongest(baseline_rows(state.baselines["train"], scored, state.baselines["aus"]))
    metrics.update({f"eval/best_baseline.{k}": v["score"] for k, v in best.items() if v is not None})
    return metrics


def evaluation_tasks(cfg) -> dict[str, str]:
    """{task: prompt} asked at each held-out evaluation: the trained tasks, or the paper's captioning alone."""
    return cfg.tasks.prompts() if cfg.tasks.multi else {"describe": ""}


def evaluate(run, state: HeldoutState, model_inputs) -> dict:
    """Collective: the held-out metrics of this step (complete on rank 0), and the best step so far."""
    run.engine.module.eval()
    try:
        metrics = {"eval/loss": heldout_loss(run, model_inputs)}
        if run.cfg.train.eval_generate and run.cfg.train.stage in CAPTION_STAGES:
            for task, prompt in evaluation_tasks(run.cfg).items():
                captions, labels = heldout_captions(run, prompt)
                if run.rank == 0:
                    metrics.update(caption_scores(run, state, captions, labels, task))
    finally:
        run.engine.module.train()
    if metrics["eval/loss"] < state.best_loss:
        state.best_step, state.best_loss = run.step, metrics["eval/loss"]
    return {**metrics, "eval/best_loss": state.best_loss, "eval/best_step": state.best_step}
