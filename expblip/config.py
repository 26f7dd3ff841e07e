"""Typed run configuration: defaults < YAML file < dotted command-line overrides.

Each component owns a dataclass (model, data, optim, train, tracking, ray); `Config` composes them.
Loading is strict: an unknown key or a value of the wrong type is an error that names the key.

    cfg = load_config("recipes/demo.yaml", ["optim.lr=1e-4", "data.train.shards=/data/manifest.json"])
    dump_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from expblip.data.stream import StreamConfig
from expblip.data.tasks import TasksConfig
from expblip.model.blip2 import ModelConfig
from expblip.model.stage1 import Stage1Config

COLLECTIVE_TIMEOUT_S = 1800  # the process group's collective timeout (both launchers set it explicitly)
OUTAGE_MARGIN_S = 300  # data.max_outage_s stays this far below it


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@dataclass
class DataConfig:
    """Where training and evaluation samples come from (see expblip.data.stream.StreamConfig)."""

    train: StreamConfig = field(default_factory=StreamConfig)
    eval: StreamConfig = field(default_factory=lambda: StreamConfig(train=False, shuffle_buffer=0))
    max_text_tokens: int = 64  # caption tokens after the query tokens (the released code used 32; too short)
    # stage2 of Qwen2.5-VL: each micro-batch's samples packed end to end into rows of at most this many tokens, each
    # sample with its own positions (mRoPE) and attention (0 = padded rows, one sample each). The same loss and
    # gradients as the padded batch, without the padding's compute
    pack_tokens: int = 0
    # storage (S3) that stops answering is retried with back-off this long, then the attempt fails on every rank
    # together (and Ray restarts it from the checkpoint); must stay well below the collectives' timeout
    max_outage_s: float = 120.0

    def __post_init__(self) -> None:
        if self.pack_tokens < 0:
            raise ConfigError(f"data.pack_tokens must be >= 0 (0 = no packing), got {self.pack_tokens}")
        if not 0 < self.max_outage_s <= COLLECTIVE_TIMEOUT_S - OUTAGE_MARGIN_S:
            raise ConfigError(f"data.max_outage_s must lie in (0, {COLLECTIVE_TIMEOUT_S - OUTAGE_MARGIN_S}]: the "
                              "other ranks wait that long in a collective for a rank whose storage is out, and "
                              f"collectives time out after {COLLECTIVE_TIMEOUT_S} s")


@dataclass
class OptimConfig:
    """AdamW + linear warm-up + cosine decay; no weight decay on biases and norms."""

    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-5  # floor of the cosine
    warmup_steps: int = 100  # linear warm-up from warmup_start_lr
    warmup_start_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    grad_accum: int = 1  # micro-batches per optimiser step

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr ({self.min_lr}) is above optim.lr ({self.lr}); lower min_lr")
        if self.grad_accum < 1:
            raise ConfigError("optim.grad_accum must be >= 1")


@dataclass
class TrainConfig:
    """The loop: what to train, how long, where the run lives."""

    # vision / lm: the tiny world's tower pre-training (ViT on AU labels; OPT on caption text); stage1 / stage2: BLIP-2's
    stage: Literal["vision", "lm", "stage1", "stage2"] = "stage2"
    vision_aus: tuple[int, ...] = (1, 2, 4, 5, 6, 9, 12, 15, 20, 25, 26, 43)  # AUs the 'vision' stage's head predicts
    run_dir: str = "runs/default"  # checkpoints, resolved config, MLflow store (local path)
    max_steps: int = 200  # optimiser steps in total (a resumed run continues up to this); sets the lr schedule
    stop_after: int = 0  # stop with a checkpoint after this step, as a time-boxed job would (0 = run to max_steps)
    log_every: int = 10
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0 = all)
    seed: int = 0
    ds_config: str = "ds_configs/zero3.json"  # DeepSpeed JSON: ZeRO stage and precision policy; numbers come from here
    # frozen ViT / OPT: replicated on every device (ZeRO-2), partitioned (ZeRO-3), auto = replicated when
    # expblip.train.plan says they fit beside everything else (partitioned on CPU ranks), config = the JSON's stage
    placement: Literal["config", "auto", "replicated", "partitioned"] = "config"
    # activation checkpointing: config = model.checkpointing as given; auto = expblip.train.plan picks the least
    # recomputation that fits the devices (with placement=auto, both together), decided on rank 0 for every rank
    activation_checkpointing: Literal["config", "auto"] = "config"
    # what the run writes at its end: the full HF-format export/ (GBs at paper scale), the trainable-only
    # export-trainable/ (Q-Former-sized; merge it onto model.weights with launch/export.py --merge), or both
    export: Literal["full", "trainable", "both"] = "full"
    resume: bool = True  # continue from the newest checkpoint in run_dir when there is one
    overwrite: bool = False  # allow starting fresh in a run_dir that already holds another run
    # held-out evaluation on data.eval (expblip.train.heldout): every eval_every steps (0 = off) and at the end
    eval_every: int = 0
    eval_batches: int = 4  # held-out batches per rank for eval/loss (the same fixed batches every time)
    eval_generate: int = 0  # held-out images captioned (greedy) and scored by the evaluator per evaluation; 0 = off
    eval_max_new_tokens: int = 40  # caption length limit of those captions
    # under ZeRO-3, those captions' weights: "auto" gathers the whole model once per evaluation where every rank's
    # free memory holds it (expblip.train.engine.whole_model_fits), "always", or "never": ZeRO-3 all-gathers each
    # layer at every generated token and every rank steps generate together (synced_gpus)
    eval_gather: Literal["auto", "always", "never"] = "auto"
    eval_aus: tuple[int, ...] = ()  # AUs scored by eval/mean_au_f1; () = every AU of the training labels
    # what the held-out evaluation selects: eval.best_step (lowest eval/loss), and with keep=best the export. So
    # data.eval must be validation shards: shards whose manifest says test, all or train are refused unless
    # eval_on_test=true, which tags the run's selection as made on those faces (expblip.train.heldout)
    keep: Literal["last", "best"] = "last"  # the export: the last step, or the step selected on data.eval
    eval_on_test: bool = False
    log_keys: bool = False  # every rank appends the sample keys of each step to run_dir/keys/rank{r}.jsonl (audit)

    def __post_init__(self) -> None:
        if self.eval_every < 0 or self.eval_batches < 1 or self.eval_generate < 0:
            raise ConfigError("train.eval_every and train.eval_generate must be >= 0 and train.eval_batches >= 1")
        if self.keep == "best" and not self.eval_every:
            raise ConfigError("train.keep=best exports the step with the lowest held-out loss: set train.eval_every "
                              "(and data.eval.shards to validation shards), or train.keep=last")


@dataclass
class TrackingConfig:
    """MLflow, from rank 0 only. uri '' means $MLFLOW_TRACKING_URI, else SQLite under the run directory."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "expblip"
    run_name: str = ""  # '' = the run directory's name
    parent_run_id: str = ""  # MLflow run this one nests under (tag mlflow.parentRunId), e.g. a pipeline's run
    recipe: str = ""  # tag 'recipe'; '' = the stem of the --config file
    system_metrics_every_s: float = 10.0  # MLflow system/* metrics (CPU, memory, disk, network, GPU); 0 = off
    # artefact 'export' at the end: the trainable-only export (Q-Former, queries, projection + fingerprints of the
    # frozen towers; MBs at paper scale), the full HF-format export (GBs), or none
    log_export: Literal["trainable", "full", "none"] = "trainable"
    run_id: str = ""  # attach to this MLflow run ('' = the run directory's, else a new one); the Ray driver sets it
    flush_timeout_s: float = 60.0  # at the end, how long to wait for calls queued while the server was out


@dataclass
class RayConfig:
    """Ray Train scaling and storage (launch/pretrain.py)."""

    address: str = ""  # '' = attach when $RAY_ADDRESS is set (ray job submit), else start a local Ray; or 'auto'/URL
    # workers: a number, or [min, max] for elastic training (the group shrinks to the workers it can get when a node
    # is lost, down to min, continuing from the last checkpoint, and grows back to max when nodes return)
    num_workers: int | tuple[int, int] = 2
    resize_check_s: float = 60.0  # elastic: how often Ray looks for room to grow a running group back
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage_path: str = ""  # '' = <run_dir>/ray; a local path or s3://bucket/prefix
    max_failures: int = 0  # worker-group failures (a lost node included) restarted from the last checkpoint
    verbose: bool = False  # show Ray's own console output (workers, controller) instead of expblip's lines only
    # how workers get S3 keys and MLflow passwords (never through Ray's runtime_env): from their own environment,
    # as cluster nodes are provisioned; or from a 0600 file the driver writes (only a local cluster shares it);
    # auto = file when every Ray node runs on the driver's machine, else environment (expblip/credentials.py)
    credentials: Literal["auto", "environment", "file"] = "auto"

    def __post_init__(self) -> None:
        low, high = self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers,) * 2
        if not 1 <= low <= high or self.cpus_per_worker <= 0 or self.resize_check_s < 0:
            raise ConfigError("ray.num_workers must be >= 1 (or [min, max] with 1 <= min <= max), "
                              "ray.cpus_per_worker > 0 and ray.resize_check_s >= 0")


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # instructions trained at once (expblip.data.tasks), in the lm and stage2 stages; the other stages only train
    # their tiny tokenizer on the prompts and answers too
    tasks: TasksConfig = field(default_factory=TasksConfig)

    def __post_init__(self) -> None:
        if self.train.eval_every and not self.data.eval.shards:
            raise ConfigError("train.eval_every needs held-out shards: set data.eval.shards (or train.eval_every=0)")
        self._streams_at_model_resolution()
        if self.model.lora.enabled and self.train.stage != "stage2":
            raise ConfigError(f"model.lora.towers is set in train.stage={self.train.stage}; LoRA adapters train in "
                              "stage2 only (set model.lora.towers=[] for this stage)")


    def _streams_at_model_resolution(self) -> None:
        """data.train/eval.dynamic follow model.min_pixels / max_pixels (one source: the model's): set here."""
        bounds = tuple(self.model.bounds)
        for name in ("train", "eval"):
            stream = getattr(self.data, name)
            if stream.dynamic and tuple(stream.dynamic) != bounds:
                raise ConfigError(f"data.{name}.dynamic={list(stream.dynamic)} differs from model.min_pixels / "
                                  f"model.max_pixels {list(bounds) or '(square images)'}; set the model's and leave "
                                  f"data.{name}.dynamic out")
            stream.dynamic = bounds


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Defaults < YAML at `path` < `key.sub=value` overrides, checked strictly against the dataclasses."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file or omit --config")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        if cls is Config and isinstance(tree.get("tracking", {}), dict):
            tree.setdefault("tracking", {}).setdefault("recipe", path.stem)
    for item in overrides or []:
        _set_dotted(tree, item)
    return from_dict(cls, tree)


def _set_dotted(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def from_dict(cls: type, tree: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys under {prefix.rstrip('.') or 'the root'}: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in tree.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key {key!r} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} must be {tp}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
        return origin(_coerce(item_tp, v, key) for v in value)
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key {key!r} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and MLflow."""
    return _plain(dataclasses.asdict(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def public_dict(cfg: Any) -> dict:
    """to_dict with every URI's ``user:password@`` redacted: what run files, checkpoints and MLflow params hold."""
    from expblip.credentials import redact_uri

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return redact_uri(obj) if isinstance(obj, str) and "://" in obj and "@" in obj else obj

    return clean(to_dict(cfg))


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML (loadable again with load_config; URIs' passwords redacted)."""
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write config_yaml(cfg) to `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_yaml(cfg))
