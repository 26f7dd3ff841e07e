"""The one training loop, run by both launchers (`deepspeed launch/finetune.py`, Ray Train's launch/pretrain.py).

    run = setup(cfg)                  # process group, tokenizer, model, DeepSpeed engine, resume, loader, MLflow
    while run.step < run.end:
        step(run)                     # grad_accum micro-batches -> one optimiser step; then, when due, the log
                                      # (means over the window), the held-out evaluation and a checkpoint
    export(run); _finish(run)         # HF-format export, artefacts

CPU run (2 ranks):  deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero3.json data.train.shards=DIR
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expblip.config import Config, ConfigError, config_yaml, dump_config, public_dict
from expblip.data.shards import resolve_shards
from expblip.data.stream import Cursor, StreamError, make_loader, read_captions, resolve_with_retry
from expblip.data.tasks import sample_text, task_vocabulary
from expblip.log import get_logger
from expblip.model.spec import ModelSpec, spec_for_preset
from expblip.model.weights import WeightSource, open_towers, save_trainable_export
from expblip.pixels import image_sizes, normalise_batch, to_device
from expblip.train import checkpoint, comm, heldout
from expblip.train import engine as ds_engine
from expblip.train.load import load_fp32_masters, load_initial_weights
from expblip.train.optim import build_optimizer, build_scheduler
from expblip.train.tracking import git_commit, make_tracker

log = get_logger(__name__)

Reporter = Callable[[dict, int, Path | None], None]  # (metrics, step, checkpoint dir or None)


@dataclass
class Run:
    """Everything a step needs; built once by setup()."""

    cfg: Config
    rank: int
    world: int
    engine: object
    tokenizer: object
    blip2_config: object
    ds_config: dict
    batches: Iterator[dict]
    cursor: Cursor
    tracker: object
    step: int = 0
    end: int = 0  # the step this process stops at (train.max_steps, or train.stop_after)
    errors: dict = field(default_factory=dict)  # worker -> {kind: count}, cumulative
    history: list = field(default_factory=list)  # (step, loss) on rank 0
    window: Window = field(default_factory=lambda: Window())  # what the next log line averages
    tokens: torch.Tensor | int = 0  # text tokens (attention mask ones) since the last log, summed on the device
    qformer_tokenizer: object = None
    report: Reporter | None = None
    heldout: heldout.HeldoutState = field(default_factory=heldout.HeldoutState)
    attempt: int = 0  # when this process group started (rank 0's clock, ns): tells restarted attempts apart
    resized_from: int = 0  # the world size of the checkpoint resumed from, when it differs from this one
    packed: bool = False  # the first packed micro-batch was reported (data.pack_tokens)


@dataclass
class Window:
    """The steps since the last log line: their losses (and stage 1's parts) are averaged, their time measured."""

    losses: list = field(default_factory=list)  # this rank's mean loss of each step (0-d tensors on the device)
    parts: dict = field(default_factory=dict)  # name -> list of this rank's values (stage 1: loss_itc, ...)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Kept as device tensors: read once at log time, not synchronised with the host at every step."""
        self.losses.append(loss.detach())
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value.detach())


# ---------------------------------------------------------------- setup


def preflight(cfg: Config, wait_for_storage: bool = True) -> str:
    """Checks that fail fast, before any process group, worker or file: shards, the DeepSpeed policy and the split
    held-out evaluation selects on. With ``wait_for_storage``, storage that does not answer is waited for up to
    data.max_outage_s (a restarted attempt after an outage); a Ray driver checks at once. Returns that split
    (heldout.selection_split; "" without held-out evaluation)."""
    if wait_for_storage:
        resolve_with_retry(cfg.data.train.shards, cfg.data.max_outage_s)
    else:
        resolve_shards(cfg.data.train.shards)
    ds_engine.load_ds_config(cfg.train.ds_config)
    spec = spec_for_preset(cfg.model.preset)
    if cfg.train.stage not in spec.stages:
        raise ConfigError(f"train.stage={cfg.train.stage}: model.preset {cfg.model.preset} ({spec.name}) trains in "
                          f"stages {', '.join(spec.stages)}")
    for where, stream in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if stream.shards and not stream.dynamic and stream.image_size != cfg.model.image_size:
            raise ConfigError(f"{where}.image_size={stream.image_size} but model.preset {cfg.model.preset} takes "
                              f"{cfg.model.image_size} px images; set {where}.image_size={cfg.model.image_size}")
    if cfg.data.pack_tokens and (spec.pack is None or cfg.train.stage != "stage2"):
        raise ConfigError(f"data.pack_tokens={cfg.data.pack_tokens}: packing is built for stage2 of families with "
                          f"per-sample positions (Qwen2.5-VL); model.preset {cfg.model.preset} ({spec.name}), "
                          f"train.stage={cfg.train.stage}: set data.pack_tokens=0")
    if cfg.train.export in ("trainable", "both") and not spec.trainable_export:
        raise ConfigError(f"train.export={cfg.train.export}: model.preset {cfg.model.preset} ({spec.name}) writes "
                          "full exports only; set train.export=full")
    return heldout.selection_split(cfg) if cfg.train.eval_every else ""  # never select on test faces


def _quiet_libraries() -> None:
    """Libraries' own INFO chatter (MLflow store creation and system-metrics notes, transformers' shard-writing bars)
    would bury the loop's lines; their warnings still show."""
    import logging
    import os

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported (the tracker)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it already was
    hf_logging.disable_progress_bar()


def setup(cfg: Config, report: Reporter | None = None) -> Run:
    eval_split = preflight(cfg)
    _quiet_libraries()
    rank, world = comm.init_distributed()  # binds this rank's device first
    cfg = _decide_policy(cfg, rank, world)
    ds_config = ds_engine.resolve_ds_config(cfg, world)
    run_dir = Path(cfg.train.run_dir)
    tag = _check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    source = _open_source(cfg, rank)  # headers only, on every rank
    tokenizer = _tokenizer(cfg, rank, run_dir, source)
    qformer_tokenizer = _qformer_tokenizer(cfg, rank, run_dir, source) if cfg.train.stage == "stage1" else None
    model = build_unit(cfg, ds_config, tokenizer, qformer_tokenizer, init=source is None)
    blip2_cfg = spec_for_preset(cfg.model.preset).hf_model(model).config
    elastic = _elastic_resume(run_dir, tag, rank, world)
    loaded = None
    if source is not None:  # also on a resume: checkpoints leave out the frozen towers that model.weights holds
        loaded = load_initial_weights(model, source, cfg.model.allow_missing, rank)
    if elastic is not None:  # another world size: the weights go in before DeepSpeed builds its fp32 partitions
        checkpoint.load_weights_into(model, checkpoint.elastic_weights(elastic), rank)
    ds_engine.communication_dtype(ds_config, model)
    optimizer = build_optimizer(model, cfg.optim)
    # the schedule is built on DeepSpeed's wrapped optimiser, whose param groups differ from ours under ZeRO
    engine = ds_engine.initialize(model, optimizer, lambda opt: build_scheduler(opt, cfg.optim, cfg.train.max_steps),
                                  ds_config)
    if loaded is not None and tag is None and ds_engine.precision(ds_config) != "fp32":
        load_fp32_masters(engine, source, loaded)  # the trained parts start from the source's values, not bf16's
    if source is not None:
        source.close()
    _report_resident(engine.module, rank, world)
    log.info(f"attention {blip2_cfg._attn_implementation} on {engine.device}; "
             f"{ds_engine.precision(ds_config)} engine, ZeRO-{ds_engine.zero_stage(ds_config)}")
    random.seed(cfg.train.seed + rank)  # dropout and augmentation differ per rank; a resume restores them below
    torch.manual_seed(cfg.train.seed + rank)
    step, client, cursor_state = _resume(engine, run_dir, tag, elastic, rank, frozen_from=cfg.model.weights_id)
    cursor = Cursor.from_state_dict(cursor_state) if cursor_state else Cursor()
    batches = iter(make_loader(cfg.data.train, rank, world, cursor=cursor, max_outage_s=cfg.data.max_outage_s))
    tracker = make_tracker(cfg.tracking, run_dir, rank, client.get("mlflow_run_id"))
    end = min(cfg.train.max_steps, cfg.train.stop_after or cfg.train.max_steps)
    run = Run(cfg, rank, world, engine, tokenizer, blip2_cfg, ds_config, batches, cursor, tracker, step=step, end=end,
              report=report, qformer_tokenizer=qformer_tokenizer,
              heldout=heldout.HeldoutState.from_state_dict(client.get("heldout")), attempt=_attempt_id(),
              resized_from=_resized_from(client, world))
    run.heldout.split = eval_split
    _record_start(run)
    if tag is not None:
        _log_trainable_digest(run, "restored")
    return run


def _decide_policy(cfg: Config, rank: int, world: int) -> Config:
    """Collective: train.placement=auto and train.activation_checkpointing=auto decided once, by rank 0 on its
    devices (expblip.train.plan.policy_for_run), and the same answer on every rank: ranks that chose apart (nodes
    with other GPUs) would build different engines and hang in their first collective. The returned config says
    what was decided, so the run's config.yaml, checkpoints and export carry it."""
    import dataclasses

    from expblip.train.plan import policy_for_run

    if cfg.train.placement != "auto" and cfg.train.activation_checkpointing != "auto":
        return cfg
    policy = comm.broadcast_object(policy_for_run(cfg, world) if rank == 0 else None)
    log.info(f"frozen towers {policy.placement or 'as the DeepSpeed config says'}, activation checkpointing "
             f"{'+'.join(policy.checkpointing) or 'none'}: {policy.why}")
    train = dataclasses.replace(cfg.train, placement=policy.placement or "config", activation_checkpointing="config")
    model = dataclasses.replace(cfg.model, checkpointing=tuple(policy.checkpointing))
    return dataclasses.replace(cfg, train=train, model=model)


def _resized_from(client: dict, world: int) -> int:
    """The world size of the checkpoint resumed from, when it differs from this one (0 otherwise)."""
    saved = client.get("world_size", world)
    return saved if saved != world else 0


def _open_source(cfg: Config, rank: int) -> WeightSource | None:
    """model.weights (and the towers given on their own), headers only; rank 0 lists what a tower source holds
    beyond its tower (left out)."""
    if not cfg.model.has_weights:
        return None
    m = cfg.model
    source = open_towers(m.weights, m.vision_weights, m.lm_weights)
    for where, names in getattr(source, "unused", {}).items() if rank == 0 else ():
        log.info(f"{where}: {len(names)} tensors outside the tower taken from it are left out "
                 f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return source


def _attempt_id() -> int:
    """Collective: rank 0's clock at start-up, the same on every rank (the key log tells attempts apart by it)."""
    return comm.broadcast_object(time.time_ns())


def build_unit(cfg: Config, ds_config: dict, tokenizer, qformer_tokenizer, init: bool) -> torch.nn.Module:
    """The training unit, partitioned as it is built (ZeRO-3), with each part in its dtype and checkpointing set.

    init=False (model.weights will fill it): nothing is randomly initialised, and the model is built directly in
    the dtype it trains in (the engine's 16-bit dtype, or model.frozen_dtype for fp32 engines: trainable parts are
    then cast to fp32), so no fp32 copy of the frozen towers ever exists.
    """
    fp32_engine = ds_engine.precision(ds_config) == "fp32"
    dtype = None if init else ds_engine.construction_dtype(ds_config, cfg.model.frozen_dtype)
    spec = spec_for_preset(cfg.model.preset)
    model = ds_engine.build_partitioned(
        ds_config, lambda d: _training_unit(spec, cfg, tokenizer, qformer_tokenizer, init, d), init=init, dtype=dtype)
    spec.freeze(spec.hf_model(model), cfg.model, cfg.train.stage, torch.float32 if fp32_engine else None)
    spec.checkpointing(spec.hf_model(model), cfg.model.checkpointing)
    ds_engine.cast_partitions(model)  # model.frozen_dtype and the fp32 trainable parts, under ZeRO-3
    return model


def _elastic_resume(run_dir: Path, tag: str | None, rank: int, world: int) -> dict | None:
    """The elastic state (rank 0; {} elsewhere) when resuming a checkpoint written by another world size, else None."""
    if tag is None:
        return None
    saved = checkpoint.written_world_size(run_dir, tag)
    if saved == world:
        return None
    position = Cursor.from_state_dict(checkpoint.data_cursor(run_dir, tag)).describe()
    log.info(f"checkpoint {tag} was written by {saved} ranks and this run has {world}: restoring weights and "
             f"optimiser state from its {checkpoint.ELASTIC}; the data continues at its {position}")
    return checkpoint.read_elastic(run_dir, tag, rank)


def _resume(engine, run_dir: Path, tag: str | None, elastic: dict | None, rank: int,
            frozen_from: str = "") -> tuple[int, dict, dict]:
    """(step, client state: MLflow run id, held-out best step..., loader cursor state) after restoring checkpoint
    `tag`; fresh: (0, {}, None). `frozen_from`: model.weights, which already filled the frozen towers."""
    if tag is None:
        return 0, {}, None
    if elastic is None:  # same world size: DeepSpeed's own shards, this rank's exact loader position and RNG
        client, cursor_state = checkpoint.load(engine, run_dir, tag, frozen_from=frozen_from)
    else:  # another world size: the data position is the same number for every rank (expblip.data.order)
        client = checkpoint.restore_elastic(engine, elastic, rank)
        cursor_state = checkpoint.data_cursor(run_dir, tag)
    left_out = client.get("frozen_from") or ""
    if left_out and left_out != frozen_from:  # every rank reads the same client state: all raise together
        raise ConfigError(f"checkpoint {tag} left out the frozen towers of model.weights={left_out}; resume it with "
                          f"that model.weights (this run has {frozen_from or 'none'})")
    return client["step"], client, cursor_state


def _report_resident(module: torch.nn.Module, rank: int, world: int) -> None:
    """Collective; rank 0 logs the parameter bytes each rank holds (about 1/world of the model under ZeRO-3's
    partitioned construction) and each rank's host memory after building and loading (resident now, peak so far)."""
    held, total = ds_engine.resident_parameter_bytes(module)
    shares = comm.all_gather_object((held, *_host_memory()))
    mib, gib = 2**20, 2**30
    log.info(f"resident parameters per rank (MiB of {total / mib:.3f}): "
             + ", ".join(f"rank {r} {h / mib:.3f} (share {h / total:.4f})" for r, (h, _, _) in enumerate(shares))
             + f"; 1/world = {1 / world:.4f}")
    log.info("host memory per rank after loading (GiB, now / peak): "
             + ", ".join(f"rank {r} {now / gib:.2f} / {peak / gib:.2f}" for r, (_, now, peak) in enumerate(shares)))


def _host_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes so far) of this process."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _training_unit(spec: ModelSpec, cfg: Config, tokenizer, qformer_tokenizer, init: bool = True,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module the engine wraps for this stage (the family's); spec.hf_model(unit) is what gets exported."""
    unit = spec.training_unit(cfg, tokenizer, qformer_tokenizer, init=init, dtype=dtype)
    for param in getattr(unit, "external_parameters", list)():  # read outside their owner's forward: gather them
        ds_engine.register_external(unit, param)
    return unit


def _qformer_tokenizer(cfg: Config, rank: int, run_dir: Path, source: WeightSource | None = None):
    """Stage 1's Q-Former text tokenizer: given (stage1.qformer_tokenizer, a local BERT tokenizer as BLIP-2 reads),
    saved in the run or beside its weights, or, for the tiny preset only, trained on the captions."""
    spec = spec_for_preset(cfg.model.preset)
    load_qformer_tokenizer, train_qformer_tokenizer = spec.load_stage1_tokenizer, spec.train_stage1_tokenizer
    if cfg.stage1.qformer_tokenizer:
        return load_qformer_tokenizer(cfg.stage1.qformer_tokenizer)
    for candidate in (run_dir / "qformer_tokenizer", Path(_weights_dir(cfg.model.weights) or "/nonexistent",
                                                          "qformer_tokenizer")):
        if (candidate / "tokenizer.json").is_file():
            return load_qformer_tokenizer(candidate)
    fetched = _fetch_tokenizer(source, "qformer_tokenizer")
    if fetched:
        return load_qformer_tokenizer(fetched)
    if cfg.model.preset != "tiny":  # a real Q-Former reads BERT's vocabulary: no whole-dataset scan for a new one
        raise ConfigError(f"model.preset {cfg.model.preset} in stage 1 needs stage1.qformer_tokenizer: a local "
                          "directory holding BERT's tokenizer (a copy of bert-base-uncased's), as BLIP-2 uses")
    # the trainer is deterministic: every rank builds the same vocabulary
    captions = comm.broadcast_object(read_captions(cfg.data.train) if rank == 0 else None)
    tokenizer = train_qformer_tokenizer(captions, cfg.stage1.qformer_vocab)
    if rank == 0:
        tokenizer.save_pretrained(run_dir / "qformer_tokenizer")
    return tokenizer


def _check_run_dir(cfg: Config, run_dir: Path) -> str | None:
    """Collective: the checkpoint tag to resume from (rank 0's newest complete one), or None; refuses to write over
    another run."""
    # one choice for every rank, also where nodes see different directories
    tag = comm.broadcast_object(checkpoint.latest_tag(run_dir))
    if tag is not None and cfg.train.resume and not (checkpoint.checkpoint_root(run_dir) / tag).is_dir():
        raise ConfigError(f"checkpoint {tag}, which rank 0 resumes from, is not in {run_dir} on this node: "
                          "give every node the same train.run_dir (a shared volume) or Ray storage to restore from")
    if tag is not None and not cfg.train.resume and not cfg.train.overwrite:
        raise ConfigError(f"train.run_dir {run_dir} already holds a run (checkpoint {tag}); pass train.resume=true "
                          "to continue it, another train.run_dir, or train.overwrite=true to start over")
    if tag is not None and not cfg.train.resume:
        tag = None  # overwrite: start fresh, new checkpoints replace the old ones as they are written
    comm.barrier()
    return tag


def _tokenizer(cfg: Config, rank: int, run_dir: Path, source: WeightSource | None = None):
    """A given tokenizer, the one saved in the run, the one of the initial weights, or one trained on captions (the
    family's: Qwen2.5-VL's is its processor)."""
    load_tokenizer = spec_for_preset(cfg.model.preset).load_tokenizer
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    for candidate in (str(run_dir / "tokenizer"), cfg.model.lm_weights, _weights_dir(cfg.model.weights)):
        if candidate and Path(candidate, "tokenizer.json").is_file():
            return load_tokenizer(candidate)
    fetched = _fetch_tokenizer(source)
    if fetched:
        return load_tokenizer(fetched)
    spec = spec_for_preset(cfg.model.preset)
    if cfg.model.preset not in spec.tiny_presets:
        raise ConfigError(f"model.preset {cfg.model.preset} needs model.tokenizer (a local tokenizer directory)")
    tokenizer = None
    if rank == 0:  # train once and broadcast: every rank must hold the identical vocabulary
        tokenizer = spec.train_tokenizer(read_captions(cfg.data.train) + task_vocabulary(cfg.tasks), cfg.model)
    tokenizer = comm.broadcast_object(tokenizer)
    if rank == 0:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    return tokenizer


def _weights_dir(weights: str) -> str:
    """model.weights may name an export directory or a run directory (its export/)."""
    if weights and Path(weights, "export", "config.json").is_file():
        return str(Path(weights, "export"))
    return weights


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "added_tokens.json")


def _fetch_tokenizer(source: WeightSource | None, sub: str = "") -> str:
    """A remote weights directory's tokenizer (or its `sub` directory's), copied to a local temporary directory;
    '' when there is none (local weights are read in place)."""
    if source is None or not source.directory or "://" not in source.where:
        return ""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="expblip-tokenizer-"))
    for name in TOKENIZER_FILES:
        data = source.side_file(f"{sub}/{name}" if sub else name)
        if data is not None:
            (out / name).write_bytes(data)
    return str(out) if (out / "tokenizer.json").is_file() else ""


def _record_start(run: Run) -> None:
    """Rank 0: resolved config beside the run and into MLflow."""
    if run.rank != 0:
        return
    run_dir = Path(run.cfg.train.run_dir)
    dump_config(run.cfg, run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2))
    run.tracker.log_params(public_dict(run.cfg))
    commit = git_commit()  # set on every (re)start: a resumed run may run newer code
    run.tracker.set_tags({"stage": run.cfg.train.stage, "preset": run.cfg.model.preset, "world_size": run.world,
                          "recipe": run.cfg.tracking.recipe or "(none)", "git_commit": commit,
                          "mlflow.source.git.commit": commit})
    run.tracker.log_metrics({"world_size": run.world}, step=run.step)  # on the step axis: every (re)start and resize
    if run.heldout.split:
        run.tracker.set_tags({"eval.split": run.heldout.split, "train.keep": run.cfg.train.keep})
    if run.resized_from:
        run.tracker.set_tags({f"resize.step{run.step:08d}": f"{run.resized_from}->{run.world}"})
        log.info(f"resized from {run.resized_from} to {run.world} ranks at step {run.step}")
    log.info(f"{run.cfg.train.stage} run in {run_dir}: world {run.world}, start step {run.step} of "
             f"{run.cfg.train.max_steps}, data at {run.cursor.describe()}, MLflow {run.tracker.display_uri} run "
             f"{run.tracker.run_id}")


# ---------------------------------------------------------------- step


def model_inputs(run: Run, batch: dict, task_step: int | None = None, pack: bool = False) -> dict:
    """Batch from the loader -> keyword arguments of the training unit's forward. With several tasks (config
    `tasks`), each sample gets the prompt and answer of a task drawn for (sample, step); `task_step` replaces the
    step (held-out batches use -1: the same draw at every evaluation). `pack` (training steps with
    data.pack_tokens): the text as packed rows."""
    spec = spec_for_preset(run.cfg.model.preset)
    if run.cfg.train.stage not in ("lm", "stage2"):  # the family's own stages (BLIP-2: vision, stage1)
        extra = spec.stage_inputs(run.cfg, batch, run.qformer_tokenizer)
        tensors = _on_device(run, {k: v for k, v in extra.items() if torch.is_tensor(v)})
        return {**spec.pixel_inputs(run.blip2_config, _pixels(run, batch)), **extra, **tensors}
    lm_only = run.cfg.train.stage == "lm"
    captions, prompts = batch["captions"], None
    if run.cfg.tasks.multi or any(lab.get("prompt") is not None for lab in batch["labels"]):  # instruction data
        step = run.step if task_step is None else task_step
        picked = [sample_text(run.cfg.tasks, lab, key, run.cfg.train.seed, step, cap)
                  for lab, key, cap in zip(batch["labels"], batch["keys"], batch["captions"], strict=True)]
        prompts, captions = [p for p, _ in picked], [a for _, a in picked]
    sizes = None if lm_only else image_sizes(batch["pixel_values"])
    ragged = isinstance(batch.get("pixel_values"), list)  # dynamic resolution: each image its own tokens
    text = spec.text_inputs(run.tokenizer, run.blip2_config, captions, prompts, run.cfg.data.max_text_tokens,
                            text_only=lm_only, **({"image_sizes": sizes} if ragged and sizes else {}))
    if pack:
        text = _pack(run, spec, text, sizes)
    inputs = _on_device(run, text)
    if not lm_only:
        inputs.update(spec.pixel_inputs(run.blip2_config, _pixels(run, batch)))
    return inputs


def _hf_model(run: Run) -> torch.nn.Module:
    """The HF model inside the engine's training unit (the family's attribute)."""
    return spec_for_preset(run.cfg.model.preset).hf_model(run.engine.module)


def _on_device(run: Run, tensors: dict) -> dict:
    """Host tensors → the engine's device; asynchronous from pinned memory (the loader pins on CUDA)."""
    return {k: v.to(run.engine.device, non_blocking=True) for k, v in tensors.items()}


def _pixels(run: Run, batch: dict) -> torch.Tensor | list[torch.Tensor]:
    """The batch's uint8 pixels ([B,3,S,S], or a ragged list at dynamic resolution), copied to the engine's device
    and CLIP-normalised there, in the engine's dtype."""
    dtype = torch.bfloat16 if run.engine.bfloat16_enabled() else torch.float32
    return normalise_batch(to_device(batch["pixel_values"], run.engine.device, non_blocking=True), dtype)


def _pack(run: Run, spec, text: dict, sizes: list[tuple[int, int]]) -> dict:
    """data.pack_tokens: a caption batch's text inputs (host) as packed rows (the family's pack: the same loss and
    gradients); the padded batch's tokens counted here, since packed rows carry no attention_mask."""
    packed = spec.pack(_hf_model(run), text, sizes, run.cfg.data.pack_tokens)
    tokens = int(text["attention_mask"].sum())
    run.tokens = run.tokens + tokens
    if not run.packed:  # once per process: what packing does to this data
        run.packed = True
        rows, slots = packed["input_ids"].shape
        log.info(f"packing: {len(text['input_ids'])} samples in {rows} rows of {slots} token slots (at most "
                 f"{run.cfg.data.pack_tokens}); {rows * slots} token slots instead of {text['input_ids'].numel()} "
                 f"padded, {tokens} of them tokens")
    return packed


def train_step(run: Run) -> torch.Tensor:
    """grad_accum micro-batches and one optimiser step; returns this rank's mean loss of the step."""
    losses, parts = [], {}
    for _ in range(run.cfg.optim.grad_accum):
        batch = next_batch(run)
        run.cursor.update(batch["cursor"])
        if run.cfg.train.log_keys:
            _log_keys(run, batch)
        run.errors[batch["cursor"]["worker"]] = batch["errors"]
        inputs = model_inputs(run, batch, pack=run.cfg.data.pack_tokens > 0)  # preflight: stage2 of a family that packs
        if "attention_mask" in inputs:
            run.tokens = run.tokens + inputs["attention_mask"].sum()  # on the device: no host sync per micro-batch
        out = run.engine(**inputs)
        loss = out["loss"] if isinstance(out, dict) else out  # stage 1 also returns its three parts
        run.engine.backward(loss)
        run.engine.step()
        losses.append(loss.detach().float())
        if isinstance(out, dict):
            parts = {k: v.detach().float() for k, v in out.items() if k != "loss"}
    run.step += 1
    loss = torch.stack(losses).mean()
    run.window.add(loss, parts)
    return loss


def next_batch(run: Run) -> dict:
    """Collective: this rank's next batch, once every rank has one; if any rank's stream failed (storage out longer
    than data.max_outage_s, too much bad data), every rank raises it together instead of some ranks waiting alone in
    the next collective until it times out. A rank whose storage is out keeps the others waiting here meanwhile."""
    try:
        batch, error = next(run.batches), ""
    except StreamError as exn:
        batch, error = None, f"{type(exn).__name__}: {exn}"
    failed = torch.tensor([1.0 if error else 0.0])
    comm.all_reduce(failed)  # a host-side flag: the host group, no GPU stream involved
    if failed.item() == 0:
        return batch
    errors = comm.all_gather_object(error)
    named = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
    message = f"the data stream failed at step {run.step + 1}, so every rank stops ({named})"
    log.error(message)  # rank 0 says it; the driver (and Ray) also get it raised
    raise StreamError(message)


def _log_keys(run: Run, batch: dict) -> None:
    """train.log_keys: which samples this rank trained on at this step (an audit trail of the data order)."""
    path = Path(run.cfg.train.run_dir) / "keys" / f"rank{run.rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"attempt": run.attempt, "step": run.step + 1, "rank": run.rank, "world": run.world, "keys": batch["keys"],
            "epochs": batch["epochs"], "position": batch["cursor"]["position"]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def step(run: Run) -> dict:
    """One step as the loop runs it: train_step, then the log line (means over the window), the held-out
    evaluation and a checkpoint when they are due. Collective. Returns this step's logged metrics (rank 0) or {}."""
    train_step(run)
    cfg, last = run.cfg.train, run.step == run.end
    evaluate = bool(cfg.eval_every) and (run.step % cfg.eval_every == 0 or last)
    metrics: dict = {}
    if run.step % cfg.log_every == 0 or last or evaluate:  # an evaluation's line also holds the training window
        metrics = _global_metrics(run)
        if evaluate:
            metrics.update(heldout.evaluate(run, run.heldout, model_inputs))
        _log(run, metrics)
    new_best = evaluate and cfg.keep == "best" and run.heldout.best_step == run.step  # its checkpoint is the export
    if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or last or new_best:
        path = save_checkpoint(run)
        if run.report:
            run.report(metrics, run.step, path)
    return metrics


def _global_metrics(run: Run) -> dict:
    """Collective: the window's loss (and parts) averaged over its steps and the ranks, skipped samples summed over
    ranks, throughput over the window. Starts a new window."""
    window, run.window = run.window, Window()
    seconds, steps = time.perf_counter() - window.start, len(window.losses)
    kinds = sorted({k for counts in run.errors.values() for k in counts} | {"total"})
    skipped = [sum(c.get(k, 0) for c in run.errors.values()) for k in kinds[:-1]]
    names = sorted(window.parts)
    # the window's device values, read with one copy to the host
    means = torch.stack([torch.stack(window.losses).double().mean(),
                         *(torch.stack(window.parts[n]).double().mean() for n in names),
                         torch.as_tensor(run.tokens, device=window.losses[0].device).double()]).cpu()
    t = torch.cat([means, torch.tensor([*skipped, sum(skipped)], dtype=torch.float64)])
    comm.all_reduce(t)
    run.tokens = 0
    samples = steps * run.cfg.data.train.batch_size * run.cfg.optim.grad_accum * run.world
    metrics = {"loss": t[0].item() / run.world, "lr": run.engine.get_lr()[0], "samples_per_s": samples / seconds,
               "seconds_per_step": seconds / steps}
    metrics.update({name: t[1 + i].item() / run.world for i, name in enumerate(names)})  # stage 1: loss_itc, ...
    tokens = t[1 + len(names)].item()
    if tokens > 0:
        metrics["tokens_per_s"] = tokens / seconds
    norm = run.engine.get_global_grad_norm()
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    first = 2 + len(names)
    metrics.update({f"data.skipped.{k}": t[first + i].item() for i, k in enumerate(kinds)})
    return metrics


# ---------------------------------------------------------------- checkpoint and finish


def save_checkpoint(run: Run) -> Path:
    client = {"step": run.step, "mlflow_run_id": run.tracker.run_id, "heldout": run.heldout.state_dict()}
    files = {"config.yaml": config_yaml(run.cfg),
             "ds_config.json": json.dumps(run.ds_config, indent=2)}
    path = checkpoint.save(run.engine, run.cfg.train.run_dir, run.step, client, run.cursor.state_dict(), files,
                           frozen_source=run.cfg.model.weights_id)
    if run.rank == 0:
        best = run.heldout.best_step if run.cfg.train.keep == "best" else -1
        checkpoint.prune(run.cfg.train.run_dir, run.cfg.train.keep_checkpoints, run.step, protect=best)
    _log_trainable_digest(run, "saved")
    return path


def _log_trainable_digest(run: Run, what: str) -> None:
    """Collective: rank 0 logs the digest of the trainable fp32 master weights (checkpoint.trainable_digest)."""
    digest = checkpoint.trainable_digest(run.engine, run.rank)
    log.info(f"trainable weights {what} at step {run.step}: sha256 {digest[:16]}")


def report_peak_rss(run: Run) -> list[float]:
    """Collective: every rank's peak resident memory so far (GiB, getrusage), logged by rank 0 and returned."""
    peaks = comm.all_gather_object(_host_memory()[1] / 2**30)
    log.info("peak host RSS per rank (GiB): " + ", ".join(f"rank {r} {p:.2f}" for r, p in enumerate(peaks)))
    return peaks


TRAINABLE_EXPORT = "export-trainable"  # train.export=trainable|both, or tracking.log_export=trainable


def export(run: Run) -> Path:
    """Collective: write the exports train.export asks for, streaming one gathered tensor at a time (rank 0 writes).

    export/ (full HF format, what stock transformers loads): frozen towers in the dtype they trained in, trainable
    parts from their fp32 master weights. export-trainable/: the trainable parts + fingerprints of the frozen
    towers, to be merged onto model.weights. Returns the full export, else the trainable-only one."""
    run_dir, kind = Path(run.cfg.train.run_dir), run.cfg.train.export
    small = kind in ("trainable", "both") or (run.cfg.tracking.enabled and run.cfg.tracking.log_export == "trainable")
    if small and not spec_for_preset(run.cfg.model.preset).trainable_export:  # preflight refused train.export
        log.info(f"{run.cfg.model.preset} has no trainable-only export; MLflow gets the full export")
        small = False
    if kind in ("full", "both"):
        _export_full(run, run_dir / "export")
    if small:
        _export_trainable(run, run_dir / TRAINABLE_EXPORT)
    comm.barrier()
    return run_dir / ("export" if kind in ("full", "both") else TRAINABLE_EXPORT)


class _Gathered:
    """A parameter's full value, gathered when asked (`.contiguous()`); a collective, so every rank asks for the same
    parameters in the same order. Trainable parameters come from the fp32 master weights (a bf16 engine's module
    holds them in bf16 only)."""

    def __init__(self, param, rank: int):
        self.param, self.rank = param, rank
        self.shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        self.dtype = torch.float32 if param.requires_grad else param.dtype

    def contiguous(self) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param

        if self.param.requires_grad:
            full = safe_get_full_fp32_param(self.param)
            return full.detach().to("cpu", torch.float32).reshape(self.shape) if self.rank == 0 else None
        with ds_engine.gathered([self.param]):
            return self.param.detach().to("cpu", copy=True) if self.rank == 0 else None


def _export_state(run: Run) -> dict[str, _Gathered]:
    """The HF model's parameters (tied aliases left out), each to be gathered when written; LoRA layers under their
    module names (`...q_proj.base_layer.weight`, `...lora_A.default.weight`)."""
    from expblip.model.lora import base_name
    from expblip.model.weights import tied_aliases

    aliases = tied_aliases(run.blip2_config)
    return {name: _Gathered(param, run.rank) for name, param in _hf_model(run).named_parameters()
            if base_name(name) not in aliases}


def _export_full(run: Run, out: Path) -> None:
    """Full HF-format export; LoRA adapters folded into their layers' weights (W + alpha/r * B @ A), so stock
    transformers loads it as a plain Blip2ForConditionalGeneration."""
    from expblip.model.lora import merge_adapters

    yaml_text = config_yaml(run.cfg)
    state = merge_adapters(_export_state(run), run.cfg.model.lora.scale)
    if run.rank == 0:
        spec_for_preset(run.cfg.model.preset).save_export(
            state, run.blip2_config, run.tokenizer, out, yaml_text, extra_meta=_export_meta(run),
            config_dtype=ds_engine.construction_dtype(run.ds_config, run.cfg.model.frozen_dtype))
        if run.qformer_tokenizer is not None:
            run.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    else:  # the same gathers, in the same order as rank 0's writer
        for value in state.values():
            value.contiguous()


def _export_meta(run: Run) -> dict:
    """What an export records about training besides the config: the step, the task prompts, the LoRA settings."""
    from dataclasses import asdict

    kept = run.heldout.restored_step
    meta: dict = {"step": kept if kept >= 0 else run.step, "tasks": heldout.evaluation_tasks(run.cfg)}
    if run.heldout.split:
        meta["selection"] = run.heldout.selection(run.cfg)
    if run.cfg.model.lora.enabled:
        meta["lora"] = {**asdict(run.cfg.model.lora), "scale": run.cfg.model.lora.scale}
    return meta


def _export_trainable(run: Run, out: Path) -> None:
    """Trainable tensors whole (Q-Former-sized, LoRA adapters included); frozen ones gathered one at a time and
    only hashed, under their transformers names (what merging onto the towers matches)."""
    from expblip.model.lora import base_name
    from expblip.model.weights import fingerprint

    trained, frozen = {}, {}
    for name, value in _export_state(run).items():
        tensor = value.contiguous()
        if run.rank == 0 and value.param.requires_grad:
            trained[name] = tensor
        elif run.rank == 0:
            frozen[base_name(name)] = {"sha256": fingerprint(tensor), "dtype": str(tensor.dtype).removeprefix("torch."),
                                       "shape": list(tensor.shape)}
        del tensor
    if run.rank == 0:
        save_trainable_export(trained, run.blip2_config, run.tokenizer, out, sorted(trained),
                              config_yaml(run.cfg),
                              {**_export_meta(run), "towers_from": run.cfg.model.weights_id}, frozen=frozen)
        if run.qformer_tokenizer is not None:
            run.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")


def train(cfg: Config, report: Reporter | None = None) -> dict:
    """Set up, run to cfg.train.max_steps (or stop_after), checkpoint, export. Returns rank 0's last metrics."""
    run = setup(cfg, report)
    metrics: dict = {}
    try:
        while run.step < run.end:
            metrics = step(run) or metrics
        restore_best(run)
        metrics["export"] = str(export(run))
        report_peak_rss(run)
    except BaseException:
        run.tracker.close("FAILED")
        raise
    _finish(run)
    comm.close_distributed()
    return metrics


def restore_best(run: Run) -> None:
    """Collective: with train.keep=best, the weights of the step selected on data.eval back in the engine (from
    its checkpoint, which pruning kept), so the export holds them; the last step's otherwise."""
    best = run.heldout.best_step
    if run.cfg.train.keep != "best" or best < 0 or best == run.step:
        return
    run_dir, tag = Path(run.cfg.train.run_dir), checkpoint.tag_for(best)
    elastic = _elastic_resume(run_dir, tag, run.rank, run.world)
    _resume(run.engine, run_dir, tag, elastic, run.rank, frozen_from=run.cfg.model.weights_id)
    run.heldout.restored_step = best
    log.info(f"train.keep=best: exporting step {best} (lowest eval/loss {run.heldout.best_loss:.4f} on the "
             f"{run.heldout.split} shards), not the last step {run.step}")
    _log_trainable_digest(run, f"of step {best} restored for the export")


def _eta(run: Run, seconds_per_step: float) -> str:
    left = int(seconds_per_step * (run.cfg.train.max_steps - run.step))
    return f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"


def _log(run: Run, metrics: dict) -> None:
    run.tracker.log_metrics(metrics, step=run.step)
    if run.rank != 0:
        return
    run.history.append((run.step, metrics["loss"]))
    with open(Path(run.cfg.train.run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": run.step, **metrics}) + "\n")
    progress = {"step": run.step, "total": run.cfg.train.max_steps, "loss": metrics["loss"],
                "samples_per_s": metrics["samples_per_s"], "eta": _eta(run, metrics["seconds_per_step"])}
    log.info(f"step {run.step}/{run.cfg.train.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
             f"{metrics['samples_per_s']:.1f} samples/s ETA {progress['eta']} "
             f"skipped {int(metrics['data.skipped.total'])}", extra={"progress": progress})
    if "eval/loss" in metrics:
        _log_eval(run, metrics)


def _log_eval(run: Run, metrics: dict) -> None:
    keys = [(f"eval/{task}/" if task != "describe" else "eval/", name, f"{task} " if task != "describe" else "")
            for task in heldout.TASK_METRICS for name in heldout.TASK_METRICS[task]]
    scores = [f"{label}{name} {metrics[f'{prefix}{name}']:.3f} (strongest baseline "
              f"{metrics[f'eval/best_baseline.{name}']:.3f})" for prefix, name, label in keys
              if f"{prefix}{name}" in metrics and f"eval/best_baseline.{name}" in metrics]
    log.info(f"held-out at step {run.step}: loss {metrics['eval/loss']:.4f} (best {metrics['eval/best_loss']:.4f} at "
             f"step {metrics['eval/best_step']})" + "".join(f"; {s}" for s in scores))


def _finish(run: Run) -> None:
    if run.rank == 0:
        run_dir = Path(run.cfg.train.run_dir)
        if run.heldout.best_step >= 0:
            run.tracker.set_tags({"eval.best_step": run.heldout.best_step})
        run.tracker.log_artifact(run_dir / "config.yaml")
        run.tracker.log_artifact(run_dir / "ds_config.json")
        log = run.cfg.tracking.log_export
        small = log == "trainable" and (run_dir / TRAINABLE_EXPORT).is_dir()  # a family without one: the full one
        what = run_dir / (TRAINABLE_EXPORT if small else "export")
        if log != "none" and what.is_dir():  # the small trainable-only export, or the whole HF-format one
            run.tracker.log_artifacts(what, "export")
    run.tracker.close()
