"""The paper's chain (Fig. 1) on the synthetic-face world, as a resumable pipeline of ordinary stages.

    world      shards/{au,emotion,test}    the AU dataset, the emotion dataset, held-out test faces (pipeline.world)
    vision     runs/vision                 the tiny ViT learns to see AUs on the AU dataset (tower pre-training)
    lm         runs/lm                     the tiny OPT learns the caption language of both datasets; both tower
                                           stages are shared by every model (train.tower_stages)
    au_blip    runs/au_blip[-stage1]       BLIP-2 stage 1 (ITC+ITM+ITG), then stage 2, on AU captions
    emot_blip  runs/emot_blip[-stage1]     the same on emotion captions
    pseudo     shards/pseudo_{au,emotion}  Emot-BLIP describes the emotions of AU-dataset images, AU-BLIP the AUs of
                                           emotion-dataset images (Ray actors, one shard per task; pipeline.pseudo)
    fusion     shards/fused_{concat,llm}   AU + emotion sentence -> one caption (pipeline.fusion)
    exp_blip   runs/exp_blip-{fusion}-from_{init}   stage 2 on the fused captions; Cat-BLIP is the concat one
    mix_blip   shards/mix, runs/mix_blip-from_{init}  stage 2 on the unfused sentences, both kept as captions
    evaluate   eval/{run}/                 every trained model on the held-out faces; one table at the end

A stage whose output exists is skipped: a run directory with export/config.json (its recorded config must match what
the chain asks for, else the stage is refused with the directory to delete), a complete shard manifest whose shards
are all present (a missing shard is rewritten, with the ones after it), an evaluation newer than its export.
Interrupted training resumes from its newest checkpoint, pseudo-captioning and fusion from their finished shards.

Training stages run on Ray Train (train.launcher=ray), or each in one local process (train.launcher=local).
MLflow: one parent run for the pipeline (OUT/mlflow_parent.json keeps its id across re-runs), one child run per
training stage (tracking.parent_run_id), evaluation metrics logged to the parent (``MODEL.mean_au_f1``, ...) and the full
report attached to each model's own run. Store: sqlite under OUT unless $MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from expblip.config import Config, ConfigError, flatten, load_config, to_dict
from expblip.data.shards import MANIFEST, PARTIAL_MANIFEST, read_manifest, resolve_shards, write_shards
from expblip.eval.paired import comparison_table, comparisons
from expblip.log import get_logger
from expblip.pipeline.recipe import PipelineConfig, StageConfig, stage_recipe

log = get_logger(__name__)
MODEL_NAMES = {"exp_blip": "Exp-BLIP", "au_blip": "AU-BLIP", "emot_blip": "Emot-BLIP", "cat_blip": "Cat-BLIP",
               "mix_blip": "Mix-BLIP"}
TABLE_ORDER = ("exp_blip", "au_blip", "emot_blip", "cat_blip", "mix_blip")
PARENT_FILE = "mlflow_parent.json"


def say(message: str) -> None:
    log.info(f"pipeline: {message}")


# ---------------------------------------------------------------- MLflow parent run


class ParentRun:
    """The pipeline's MLflow run: params of the recipe, evaluation metrics; re-attached by every re-run."""

    def __init__(self, uri: str, experiment: str, out: Path, name: str):
        from mlflow import MlflowClient

        self.uri, self.client, id_file = uri, MlflowClient(uri), out / PARENT_FILE
        self.experiment_id = self._experiment(experiment, out)
        if id_file.is_file():
            self.run_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"expblip.kind": "pipeline"})
            self.run_id = run.info.run_id
            id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}))

    def _experiment(self, name: str, out: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        artifacts = (out / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
        return self.client.create_experiment(name, artifact_location=artifacts)

    def log_params(self, params: dict) -> None:
        """Params are immutable in MLflow: new keys are logged, a changed value is recorded as a ``rerun.`` tag."""
        existing = self.client.get_run(self.run_id).data.params
        for key, value in flatten(params).items():
            value = str(value)[:6000]
            if key not in existing:
                self.client.log_param(self.run_id, key, value)
            elif existing[key] != value:
                self.client.set_tag(self.run_id, f"rerun.{key}", value)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


# ---------------------------------------------------------------- the chain's state


@dataclass
class Chain:
    """One pipeline run: the recipe, where it writes, the parent run, and what each stage did."""

    p: PipelineConfig
    out: Path
    parent: ParentRun | None = None
    status: dict[str, str] = field(default_factory=dict)  # stage -> "skipped" | "ran"
    notes: dict[str, str] = field(default_factory=dict)  # decisions worth a param (the fusion method used)
    exp_configs: list[Config] = field(init=False)  # train.exp_stages' training configs, checked once (empty: none)
    names: dict[str, str] = field(init=False)  # model key -> its name in the table

    def __post_init__(self) -> None:  # a bad train.exp_stages is refused here, before anything is written
        self.exp_configs = exp_stage_configs(self.p) if self.p.train.exp_stages else []
        self.names = model_names(self.exp_configs)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts).resolve()

    def mark(self, stage: str, ran: bool, detail: str = "") -> None:
        self.status[stage] = "ran" if ran else "skipped"
        say(f"{stage}: {'done' if ran else 'skipped'}{f' ({detail})' if detail else ''}")


# ---------------------------------------------------------------- shards


def shard_state(out: Path) -> str:
    """"complete" (manifest and every shard present at its recorded size), "damaged" (complete manifest, a shard
    missing or changed), or "incomplete" (no manifest yet)."""
    try:
        manifest = read_manifest(str(out))
    except (FileNotFoundError, ValueError):
        return "incomplete"
    for entry in manifest["shards"]:
        shard = out / entry["url"]
        if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
            return "damaged"
    return "complete" if manifest.get("complete") else "incomplete"


def reopen(out: Path) -> None:
    """Turn a damaged complete manifest back into a partial one: the writer then keeps the intact shards before the
    first missing one and rewrites from there (expblip.data.shards' resume)."""
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    (out / PARTIAL_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (out / MANIFEST).unlink()


def ensure_shards(chain: Chain, stage: str, out: Path, write: Callable[[], object]) -> str:
    """Run ``write`` (a resumable shard writer) unless ``out`` is complete; returns ``out``."""
    state = shard_state(out)
    if state == "complete":
        chain.mark(stage, False, f"{out} complete")
        return str(out)
    if state == "damaged":
        say(f"{stage}: {out} lost a shard; rewriting from it")
        reopen(out)
    write()
    chain.mark(stage, True, str(out))
    return str(out)


def union_manifest(out: Path, parts: Iterable[Path]) -> str:
    """A manifest at ``out`` listing the shards of ``parts`` (relative URLs): one shard spec, no copied bytes."""
    shards = []
    for part in parts:
        for entry in read_manifest(str(part))["shards"]:
            shards.append({**entry, "url": os.path.relpath(part / entry["url"], out)})
    manifest = {"format": "expblip-shards", "version": 1, "complete": True, "shards": shards,
                "meta": {"union_of": [str(p) for p in parts]}, "samples_per_shard": max(s["samples"] for s in shards),
                "max_shard_bytes": max(s["bytes"] for s in shards),
                "total_samples": sum(s["samples"] for s in shards), "total_bytes": sum(s["bytes"] for s in shards)}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    if not (out / MANIFEST).is_file() or (out / MANIFEST).read_text() != text:
        (out / MANIFEST).write_text(text)
    return str(out)


def make_world(chain: Chain) -> dict[str, str]:
    """shards/{au,emotion,test} and shards/lm (the union of both training parts, for the shared lm stage)."""
    w = chain.p.world
    shards = {}
    for part, n in (("au", w.au_samples), ("emotion", w.emotion_samples), ("test", w.test_samples)):
        out = chain.path("shards", part)
        shards[part] = ensure_shards(chain, f"world.{part}", out, lambda out=out, part=part, n=n: _write_part(
            chain, part, n, out))
    shards["lm"] = union_manifest(chain.path("shards", "lm"), [Path(shards["au"]), Path(shards["emotion"])])
    return shards


def _write_part(chain: Chain, part: str, n: int, out: Path) -> None:
    from expblip.pipeline.world import part_records

    w = chain.p.world
    meta = {"source": "expblip.pipeline.world", "part": part, "samples": n, "seed": w.seed}
    write_shards(part_records(part, n, w.seed), str(out), samples_per_shard=w.samples_per_shard, meta=meta,
                 progress=False)


# ---------------------------------------------------------------- training stages


def _scaled(value: int, scale: float) -> int:
    return max(1, round(value * scale)) if value else 0


def stage_config(chain: Chain, name: str, kind: StageConfig, shards: str, weights: str, run_dir: Path) -> Config:
    """The training config of one stage: its recipe < the chain's overrides < the user's overrides."""
    p = chain.p
    base = [f"data.train.shards={shards}", f"train.run_dir={run_dir}", f"tracking.uri={tracking_uri(chain.out)}",
            f"tracking.experiment={p.experiment}", f"tracking.run_name={name}",
            f"tracking.parent_run_id={chain.parent.run_id if chain.parent else ''}",
            f"ray.num_workers={p.train.num_workers}", f"ray.cpus_per_worker={p.train.cpus_per_worker}",
            f"ray.use_gpu={str(p.train.use_gpu).lower()}", f"ray.verbose={str(p.verbose).lower()}",
            f"model.weights={weights}",  # always, even '': a stage recipe's own default names the demo's run dirs
            f"train.seed={p.train.seed}", f"data.train.seed={p.train.seed}"]
    user = [*p.train.overrides, *kind.overrides]
    recipe = stage_recipe(kind.recipe)
    plain = load_config(recipe, base + user)
    s = p.steps_scale
    scaled = [f"train.max_steps={max(1, round(kind.steps * s))}",
              f"optim.warmup_steps={_scaled(plain.optim.warmup_steps, s)}",
              f"train.log_every={_scaled(plain.train.log_every, s)}",
              f"train.ckpt_every={_scaled(plain.train.ckpt_every, s)}"]
    return load_config(recipe, base + scaled + user)


def _recorded_mismatch(cfg: Config) -> list[str]:
    """What differs between a finished run's recorded config and ``cfg`` (shards, init weights, stage, steps)."""
    from expblip.train.ray_job import absolute_paths

    recorded_file = Path(cfg.train.run_dir, "config.yaml")
    if not recorded_file.is_file():
        return []
    recorded = flatten(yaml.safe_load(recorded_file.read_text()))
    wanted = flatten(to_dict(absolute_paths(cfg)))
    keys = ("data.train.shards", "model.weights", "train.stage", "train.max_steps")
    return [f"{k}={recorded.get(k)!r} (now {wanted[k]!r})" for k in keys if str(recorded.get(k)) != str(wanted[k])]


def train_stage(chain: Chain, name: str, cfg: Config) -> str:
    """Train on Ray unless RUN_DIR/export exists (checked against what the chain asks for); returns the run dir."""
    run_dir = Path(cfg.train.run_dir)
    if Path(run_dir, "export", "config.json").is_file():
        mismatch = _recorded_mismatch(cfg)
        if mismatch:
            raise ConfigError(f"{run_dir} ({name}) was trained with {'; '.join(mismatch)}: delete {run_dir} to "
                              "retrain it, or use another --out")
        chain.mark(name, False, f"{run_dir}/export exists")
        return str(run_dir)
    say(f"{name}: training {cfg.train.stage} for {cfg.train.max_steps} steps in {run_dir} "
        f"({chain.p.train.launcher} launcher)")
    launch(cfg, chain.p.train.launcher)
    chain.mark(name, True, f"{run_dir}/export")
    return str(run_dir)


def _train_in_this_process(cfg: Config) -> None:
    from expblip.log import setup_logging
    from expblip.train.loop import train

    setup_logging(0)  # a spawned process: a world of one, its rank 0 logs
    train(cfg)


def launch(cfg: Config, launcher: str) -> None:
    """Ray Train (expblip.train.ray_job.run), or the loop in one fresh process: a world of one, which keeps the
    process group, DeepSpeed and RANK variables out of the pipeline's own process."""
    from expblip.train import ray_job

    if launcher == "ray":
        ray_job.run(cfg)
        return
    cfg = ray_job.absolute_paths(cfg)
    ray_job.preflight(cfg)
    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)  # the loop expects it (Ray's storage makes it there)
    proc = multiprocessing.get_context("spawn").Process(target=_train_in_this_process, args=(cfg,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"training {cfg.train.run_dir} failed (exit code {proc.exitcode}); its output is above")


def train_towers(chain: Chain, shards: dict[str, str]) -> str:
    """The shared tower pre-training: 'vision' on the AU dataset (AU labels), then 'lm' on both datasets' captions."""
    weights = ""
    for stage in chain.p.train.tower_stages:
        kind = chain.p.train.vision if stage == "vision" else chain.p.train.lm
        data = shards["au"] if stage == "vision" else shards["lm"]
        weights = train_stage(chain, stage, stage_config(chain, stage, kind, data, weights, chain.path("runs", stage)))
    return weights


def train_blip(chain: Chain, name: str, shards: str, init: str) -> str:
    """AU-BLIP or Emot-BLIP: each of its BLIP-2 stages, each starting from the previous one's export."""
    weights = init
    for stage in chain.p.train.blip_stages:
        kind = chain.p.train.stage1 if stage == "stage1" else chain.p.train.stage2
        stage_name = f"{name}.stage1" if stage == "stage1" else name
        run_dir = chain.path("runs", f"{name}-stage1" if stage == "stage1" else name)
        weights = train_stage(chain, stage_name, stage_config(chain, stage_name, kind, shards, weights, run_dir))
    return weights


def train_stage2(chain: Chain, name: str, run_name: str, shards: str, init: str) -> str:
    cfg = stage_config(chain, name, chain.p.train.stage2, shards, init, chain.path("runs", run_name))
    return train_stage(chain, name, cfg)


def exp_stage_configs(p: PipelineConfig) -> list[Config]:
    """train.exp_stages' own training configs (recipe < its overrides), checked before anything trains: one family,
    ending with its captioning stage."""
    from expblip.model.spec import spec_for_preset

    configs = [load_config(stage_recipe(k.recipe), [*p.train.overrides, *k.overrides]) for k in p.train.exp_stages]
    families = {spec_for_preset(c.model.preset).name for c in configs}
    if len(families) != 1:
        raise ConfigError(f"train.exp_stages train one model, but their presets belong to {sorted(families)}: give "
                          "every stage the same model.preset")
    if configs[-1].train.stage != "stage2":
        raise ConfigError(f"train.exp_stages must end with the captioning stage (train.stage=stage2), got "
                          f"{configs[-1].train.stage!r} from {p.train.exp_stages[-1].recipe}")
    return configs


def model_names(exp_configs: list[Config]) -> dict[str, str]:
    """How the table names each model: with train.exp_stages (their configs), Exp-BLIP's place is named after
    their family."""
    from expblip.model.spec import spec_for_preset

    names = dict(MODEL_NAMES)
    if exp_configs:
        names["exp_blip"] = f"Exp-{spec_for_preset(exp_configs[-1].model.preset).label}"
    return names


def train_exp_stages(chain: Chain, world: dict[str, str], fused: str, method: str) -> str:
    """Another family in Exp-BLIP's place: train.exp_stages in order, each from the export of the one before (the
    first from random weights, or its overrides' model.weights); a 'vision' stage reads the AU dataset, every other
    stage the fused captions."""
    from expblip.model.spec import spec_for_preset

    configs = chain.exp_configs
    family = spec_for_preset(configs[-1].model.preset).name
    weights = ""  # the first stage: random, or model.weights of its overrides (published weights)
    for i, (kind, plain) in enumerate(zip(chain.p.train.exp_stages, configs, strict=True)):
        last = i == len(configs) - 1
        stage = plain.train.stage
        name, run = (f"exp_{family}", f"exp_{family}-{method}") if last else (
            f"exp_{family}.{stage}", f"exp_{family}-{method}-{stage}")
        data = world["au"] if stage == "vision" else fused
        cfg = stage_config(chain, name, kind, data, weights, chain.path("runs", run))
        weights = train_stage(chain, name, cfg)
    return weights


# ---------------------------------------------------------------- pseudo-captions, fusion, mixture


def make_pseudo(chain: Chain, world: dict[str, str], au_blip: str, emot_blip: str) -> dict[str, str]:
    """shards/pseudo_au: AU-dataset images + Emot-BLIP's emotion_caption; shards/pseudo_emotion: emotion-dataset
    images + AU-BLIP's au_caption."""
    from expblip.pipeline.pseudo import pseudo_caption

    jobs = {"au": (emot_blip, "emotion_caption"), "emotion": (au_blip, "au_caption")}
    out = {}
    for part, (model, field_name) in jobs.items():
        target = chain.path("shards", f"pseudo_{part}")
        stats = pseudo_caption(world[part], str(target), model, field_name, chain.p.pseudo)
        chain.mark(f"pseudo.{part}", bool(stats["captioned"]),
                   f"{len(stats['captioned'])} shards captioned, {len(stats['skipped_shards'])} already done, "
                   f"{stats['empty_captions']} empty captions")
        out[part] = str(target)
    return out


def pseudo_urls(pseudo: dict[str, str]) -> list[str]:
    """Both pseudo-captioned parts as one shard list (AU-dataset shards first)."""
    return [url for part in ("au", "emotion") for url in resolve_shards(pseudo[part])[0]]


def make_fused(chain: Chain, pseudo: dict[str, str], method: str) -> str:
    """shards/fused_{method}: every image's AU sentence and emotion sentence fused into one caption."""
    from expblip.pipeline.fusion import fuse_shards

    out = chain.path("shards", f"fused_{method}")
    f = chain.p.fusion

    def write() -> None:
        stats = fuse_shards(pseudo_urls(pseudo), str(out), method, f.llm if method == "llm" else None,
                            samples_per_shard=f.samples_per_shard, max_failures=f.max_failures, workers=f.workers)
        if not stats["complete"]:
            raise RuntimeError(f"fusion into {out} stopped after {stats['failed']} LLM failures ({stats['errors'][:3]});"
                               " re-run the pipeline to continue, or raise fusion.max_failures")
        if stats["missing_caption"] or stats["bad_input"]:
            say(f"fusion: skipped {stats['missing_caption']} samples without both sentences, "
                f"{stats['bad_input']} unreadable")

    return ensure_shards(chain, f"fusion.{method}", out, write)


def mix_records(urls: list[str]) -> Iterable[dict]:
    """Mix-BLIP's data: each image keeps its AU sentence and its emotion sentence as two unfused captions (the stream
    picks one per epoch), so the model sees a mixture of AU and emotion captions."""
    from expblip.data.stream import ErrorCounter, read_shard
    from expblip.pipeline.fusion import sentences

    errors = ErrorCounter.unlimited()
    for url in urls:
        for raw in read_shard(url, errors):
            labels = json.loads(raw["json"].decode("utf-8"))
            aus, emotions = sentences(labels)
            labels.pop("captions", None)
            yield {"key": raw["__key__"], "image": raw.get("png") or raw["jpg"], "labels": labels,
                   "captions": [*aus, *emotions]}


def make_mix(chain: Chain, pseudo: dict[str, str]) -> str:
    out = chain.path("shards", "mix")
    urls = pseudo_urls(pseudo)
    return ensure_shards(chain, "mix", out, lambda: write_shards(
        mix_records(urls), str(out), samples_per_shard=chain.p.fusion.samples_per_shard,
        meta={"source": urls, "mix": "unfused AU and emotion sentences"}, progress=False))


# ---------------------------------------------------------------- evaluation and the table


def evaluate_model(chain: Chain, key: str, run_dir: str, test: str, train_shards: str) -> dict:
    """Score one model on the held-out faces (cached in eval/RUN unless its export is newer)."""
    from expblip.eval.evaluate import evaluate_export, training_text
    from expblip.eval.report import write_report
    from expblip.model.generation import GenerationConfig

    out = chain.path("eval", Path(run_dir).name)
    weights = Path(run_dir, "export", "model.safetensors")
    cached = out / "metrics.json"
    if cached.is_file() and cached.stat().st_mtime >= weights.stat().st_mtime:
        chain.mark(f"evaluate.{key}", False, f"{cached} is newer than the export")
        return json.loads(cached.read_text())
    e = chain.p.eval
    result = evaluate_export(run_dir, test, gen=GenerationConfig(num_beams=e.num_beams, max_new_tokens=e.max_new_tokens),
                             limit=e.limit or None, train=training_text(train_shards),
                             batch_size=e.batch_size, progress=False)
    result["settings"]["train_shards"] = train_shards
    write_report(result, out)
    _attach_to_training_run(result, out, run_dir)
    chain.mark(f"evaluate.{key}", True, str(out))
    return result


def _attach_to_training_run(result: dict, out: Path, run_dir: str) -> None:
    """The evaluation's metrics and report files into the model's own MLflow run (DESIGN: reports attached)."""
    from expblip.eval.report import find_mlflow_run, log_to_mlflow

    found = find_mlflow_run(run_dir)
    if found:
        log_to_mlflow(result, out, found["tracking_uri"], run_id=found["run_id"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _share(counts: dict, name: str) -> float | None:
    """counts[name] as a share of the scored samples (None for results written before the count existed)."""
    # names_both is counted among the faces labelled with both aspects
    total = counts.get("both_labelled") if name == "names_both" else counts.get("samples")
    return counts[name] / total if name in counts and total else None


def _short(caption: str | None) -> str:
    if caption is None:
        return "(random labels)"
    return f'"{caption}"' if len(caption) <= 60 else f'"{caption[:57]}..."'


def results_table(rows: list[dict], baselines: list[dict], test: dict) -> str:
    """The comparison: text-parsed mean AU F1 and emotion accuracy of each model, then every baseline (chosen on
    the target's training labels) and the margin of the target over the strongest one."""
    lines = [f"Held-out test set: {test['samples']} faces ({test['au_labelled']} AU-labelled, "
             f"{test['emotion_labelled']} emotion-labelled), AU combinations unseen in training; scores parsed from "
             "the generated text; emotion accuracy counts a caption right only when the emotions it names equal the "
             f"true set. Naming AUs and an emotion: among the {test.get('both_labelled', '?')} faces labelled with "
             f"both; an emotion where none is right: among the {test.get('no_emotion', '?')} faces outside every "
             "emotion family.", "",
             "| model | trained on | mean AU F1 | emotion accuracy | names AUs and an emotion | names an emotion "
             "where none is right |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['trained_on']} | {_fmt(row['mean_au_f1'])} | "
                     f"{_fmt(row['emotion_accuracy'])} | {_fmt(row.get('names_both'))} | "
                     f"{_fmt(row.get('emotion_false_positive_rate'))} |")
    for base in baselines:
        lines.append(f"| baseline: {base['name']} | {_short(base['caption'])} | {_fmt(base['mean_au_f1'])} | "
                     f"{_fmt(base['emotion_accuracy'])} | {_fmt(base.get('names_both'))} | "
                     f"{_fmt(base.get('emotion_false_positive_rate'))} |")
    return "\n".join(lines)


def pattern_table(results: dict, order: list[str], names: dict[str, str]) -> str:
    """Emotion accuracy per held-out AU pattern, one column per model: which patterns a score rests on."""
    patterns = results[order[0]]["model"].get("emotion_by_pattern") or {}
    if not patterns:
        return ""
    lines = ["| pattern (AUs) | emotion | faces | " + " | ".join(names[k] for k in order) + " |",
             "|---|---|---:|" + "---:|" * len(order)]
    for key, entry in patterns.items():
        cells = []
        for k in order:
            got = (results[k]["model"].get("emotion_by_pattern") or {}).get(key)
            cells.append(f"{got['right']}/{got['n']}" if got else "-")
        lines.append(f"| {key} | {entry['emotion']} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margins(row: dict, best: dict) -> dict[str, float | None]:
    """The model's score minus the strongest baseline's, per metric (None where either is missing)."""
    return {metric: (row[metric] - best[metric]["score"]) if row.get(metric) is not None and best.get(metric)
            else None for metric in ("mean_au_f1", "emotion_accuracy")}


# ---------------------------------------------------------------- the recipe's chain


@dataclass
class Model:
    """A trained model of the chain: its run directory, the shards it trained on, and how the table describes it."""

    run_dir: str
    train_shards: str
    trained_on: str


def _downstream(chain: Chain, world: dict[str, str], au_blip: str, emot_blip: str, lm: str) -> dict[str, Model]:
    """Exp-, Cat- or Mix-BLIP (per the target) on the pseudo-captioned AU and emotion datasets."""
    p, init = chain.p, chain.p.init
    start = {"au_blip": au_blip, "emot_blip": emot_blip, "lm": lm}[init]
    pseudo = make_pseudo(chain, world, au_blip, emot_blip)
    models: dict[str, Model] = {}
    if p.target == "mix_blip":
        mix = make_mix(chain, pseudo)
        run = train_stage2(chain, "mix_blip", f"mix_blip-from_{init}", mix, start)
        return {"mix_blip": Model(run, mix, f"unfused AU + emotion captions, init {init}")}
    method = p.fusion_method if p.target == "exp_blip" else "concat"
    fused = make_fused(chain, pseudo, method)
    if p.train.exp_stages:  # another family in Exp-BLIP's place; Cat-BLIP (BLIP-2 on the same captions) beside it
        stages = "+".join(c.train.stage for c in chain.exp_configs)
        models["exp_blip"] = Model(train_exp_stages(chain, world, fused, method), fused,
                                   f"fused captions ({method} fusion), {stages} from its own weights")
        cat = fused if method == "concat" else make_fused(chain, pseudo, "concat")
        run = train_stage2(chain, "cat_blip", f"exp_blip-concat-from_{init}", cat, start)
        models["cat_blip"] = Model(run, cat, f"concatenated captions, init {init}")
        return models
    run = train_stage2(chain, p.target, f"exp_blip-{method}-from_{init}", fused, start)
    models[p.target] = Model(run, fused, f"fused captions ({method} fusion), init {init}")
    if p.target == "exp_blip" and method == "concat":
        models["cat_blip"] = Model(run, fused, "= Exp-BLIP (no LLM endpoint: both fuse by concatenation)")
    elif p.target == "exp_blip":
        cat = make_fused(chain, pseudo, "concat")
        run = train_stage2(chain, "cat_blip", f"exp_blip-concat-from_{init}", cat, start)
        models["cat_blip"] = Model(run, cat, f"concatenated captions, init {init}")
    return models


def train_models(chain: Chain, world: dict[str, str]) -> dict[str, Model]:
    """Every model the recipe's target needs, trained (or found) in order."""
    target = chain.p.target
    lm = train_towers(chain, world)
    models: dict[str, Model] = {}
    if target != "emot_blip":
        models["au_blip"] = Model(train_blip(chain, "au_blip", world["au"], lm), world["au"],
                                  "AU dataset, AU captions")
    if target != "au_blip":
        models["emot_blip"] = Model(train_blip(chain, "emot_blip", world["emotion"], lm), world["emotion"],
                                    "emotion dataset, emotion captions")
    if target in ("exp_blip", "cat_blip", "mix_blip"):
        models.update(_downstream(chain, world, models["au_blip"].run_dir, models["emot_blip"].run_dir, lm))
    return models


def evaluate_models(chain: Chain, models: dict[str, Model], test: str) -> dict:
    """Evaluate every model; the table (target first), and the baselines of the target's training labels."""
    results = {key: evaluate_model(chain, key, m.run_dir, test, m.train_shards) for key, m in models.items()}
    order = [chain.p.target, *(k for k in TABLE_ORDER if k != chain.p.target)]
    rows = [{"key": k, "model": chain.names[k], "trained_on": models[k].trained_on, "run_dir": models[k].run_dir,
             "mean_au_f1": results[k]["model"]["mean_au_f1"],
             "emotion_accuracy": results[k]["model"]["emotion_accuracy"],
             "names_both": _share(results[k]["model"]["counts"], "names_both"),
             "emotion_false_positive_rate": results[k]["model"].get("emotion_false_positive_rate")}
            for k in order if k in models]
    target = results[chain.p.target]
    baselines = [{**b, "names_both": _share(b.get("counts", {}), "names_both")} for b in target["baselines"]]
    best = target["best"]
    metrics = {f"{r['key']}.{name}": r[name] for r in rows for name in ("mean_au_f1", "emotion_accuracy")}
    metrics.update({f"baseline.{b['key']}.{n}": b[n] for b in baselines for n in ("mean_au_f1", "emotion_accuracy")})
    metrics.update({f"best_baseline.{n}": best[n]["score"] for n in ("mean_au_f1", "emotion_accuracy") if best[n]})
    if chain.parent:
        chain.parent.log_metrics({k: v for k, v in metrics.items() if v is not None})
    kept = ("key", "name", "caption", "mean_au_f1", "emotion_accuracy", "names_both", "emotion_false_positive_rate")
    patterns = pattern_table(results, [k for k in order if k in models], chain.names)
    # one comparison per distinct model: Cat-BLIP without an LLM endpoint is the target's own run
    distinct = {k: r for k, r in results.items() if k == chain.p.target or models[k].run_dir != models[
        chain.p.target].run_dir}
    paired = comparisons(distinct, chain.p.target, chain.names) if all("items" in r for r in distinct.values()) else []
    return {"rows": rows, "baselines": [{k: b.get(k) for k in kept} for b in baselines], "best": best,
            "margin": margins(rows[0], best), "patterns": patterns, "comparisons": paired,
            "table": results_table(rows, baselines, target["model"]["counts"])}


def _log_recipe(chain: Chain) -> None:
    from expblip.data.llm import display_url

    p = chain.p
    method = p.fusion_method
    chain.notes["fusion.resolved"] = (f"llm ({p.fusion.llm.model} at {display_url(p.fusion.llm.url)})" if method == "llm"
                                      else "concat (no LLM endpoint given: on the synthetic world both fusion methods "
                                           "without one are concatenation; pass --llm-url and --llm-model for LLM "
                                           "fusion)")
    params = to_dict(p)
    params["fusion"]["llm"]["url"] = display_url(p.fusion.llm.url)
    params.update(chain.notes)
    if chain.parent:
        chain.parent.log_params(params)
    for key, note in chain.notes.items():
        say(f"{key}: {note}")


def run_pipeline(p: PipelineConfig) -> dict:
    """Run the recipe's chain; returns {"rows", "baselines", "best", "margin" (target minus the strongest baseline),
    "table", "status", "notes", "parent_run_id", "seconds"}."""
    start = time.perf_counter()
    out = Path(p.out)
    chain = Chain(p, out)  # first: a bad train.exp_stages is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    chain.parent = ParentRun(tracking_uri(out), p.experiment, out.resolve(), name=f"pipeline {p.target}")
    say(f"recipe {p.target} -> {out.resolve()} (MLflow {chain.parent.uri}, parent run {chain.parent.run_id})")
    try:
        _log_recipe(chain)
        world = make_world(chain)
        models = train_models(chain, world)
        result = evaluate_models(chain, models, world["test"])
    except BaseException:
        chain.parent.finish("FAILED")
        raise
    chain.parent.finish()
    result.update(status=chain.status, notes=chain.notes, parent_run_id=chain.parent.run_id,
                  seconds=round(time.perf_counter() - start, 1))
    patterns = ""
    if result.get("comparisons"):
        patterns += ("\n\nPaired 95 % bootstrap intervals on the same test faces, whole AU patterns resampled "
                     f"(expblip.eval.paired):\n\n{comparison_table(result['comparisons'])}")
    if result.get("patterns"):
        patterns += f"\n\nEmotion accuracy per held-out AU pattern (right/faces):\n\n{result['patterns']}"
    (out / "results.md").write_text(result["table"] + patterns + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\n" + result["table"] + patterns + "\n", flush=True)
    say(f"results: {out / 'results.md'}; browse runs with: .venv/bin/mlflow ui --backend-store-uri {chain.parent.uri}")
    return result
