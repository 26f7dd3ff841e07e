"""Checkpoint -> HF-format export, on the CPU with no process group (launch/export.py).

    result = export_checkpoint("runs/stage2", "exports/stage2")                       # newest checkpoint, full
    result = export_checkpoint("runs/stage2/checkpoints/step00000100", "exports/small", trainable_only=True)
    merge_export("exports/small", towers="exports/initial", out="exports/merged")    # small export -> full again

A full export is what stock `transformers.Blip2ForConditionalGeneration.from_pretrained(out)` loads (sharded
safetensors, config.json, generation_config.json, tokenizer) plus expblip.json (preprocessing, caption end token,
source checkpoint) and the run's resolved config.yaml. A trainable-only export keeps the trained tensors (Q-Former,
query tokens, projection, + the ViT when it trained) and a sha256 fingerprint of every frozen tensor, so that
merging it onto other towers is refused (expblip.model.weights.merge_trainable).

Only the HF model of the training unit (its `.blip2`) is exported, as train.loop.export does: stage heads beside it
(stage 1's text embeddings and ITC/ITM/ITG heads, the vision stage's probe) are named in expblip.json and left
out; a stage-1 export carries its Q-Former text side and qformer_tokenizer/.

The weights come from DeepSpeed's own `zero_to_fp32` (ZeRO-2 or ZeRO-3 shards, trainable parameters from the fp32
master copy, frozen ones as stored). Frozen towers that the checkpoint left out (it does when model.weights holds
them) are streamed from model.weights; every tensor is materialised only while it is written or hashed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from expblip.config import Config, ConfigError, load_config
from expblip.model.blip2 import apply_freezing, blip2_config
from expblip.model.lora import merge_adapters
from expblip.model.tokenizer import load_tokenizer
from expblip.model.weights import (
    PREFIX,
    merge_trainable,
    open_towers,
    read_trainable_export,
    save_hf_dir,
    save_trainable_export,
    strip_prefix,
)
from expblip.train import checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """Where one DeepSpeed checkpoint lives: root/tag holds the shards; run_dir may hold tokenizer/ and config."""

    root: Path
    tag: str
    run_dir: Path

    @property
    def path(self) -> Path:
        return self.root / self.tag


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its newest checkpoint), its checkpoints/ directory, or one stepNNNNNNNN directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; pass a run directory or a checkpoint directory")
    if any(path.glob("*model_states.pt")):  # a tag directory: DeepSpeed's shards are in it
        return Checkpoint(path.parent, path.name, path.parent.parent)
    root = path if (path / "latest").is_file() else checkpoint.checkpoint_root(path)
    tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    if not tag or not (root / tag).is_dir():
        raise FileNotFoundError(f"{path} holds no complete DeepSpeed checkpoint (no {root / 'latest'} naming an "
                                "existing directory); pass RUN_DIR or RUN_DIR/checkpoints/stepNNNNNNNN")
    return Checkpoint(root, tag, root.parent)


def run_config(ckpt: Checkpoint) -> tuple[Config, str]:
    """(resolved config, its YAML text) of the checkpoint, else of its run directory."""
    for file in (ckpt.path / "config.yaml", ckpt.run_dir / "config.yaml"):
        if file.is_file():
            return load_config(file), file.read_text()
    raise FileNotFoundError(f"no config.yaml in {ckpt.path} or {ckpt.run_dir}; the export needs the run's config "
                            "to rebuild the model's architecture")


def find_tokenizer(cfg: Config, ckpt: Checkpoint, override: str = ""):
    """The run's tokenizer, where the training loop found it (train.loop._tokenizer's order)."""
    candidates = [override, str(ckpt.path / "tokenizer"), cfg.model.tokenizer, str(ckpt.run_dir / "tokenizer"),
                  cfg.model.lm_weights]
    weights = Path(cfg.model.weights) if cfg.model.weights else None
    if weights is not None:
        candidates += [str(weights / "export"), str(weights)]  # model.weights: an export or a run directory
    for candidate in candidates:
        if candidate and Path(candidate, "tokenizer.json").is_file():
            return load_tokenizer(candidate)
    tried = [c for c in candidates if c]
    raise FileNotFoundError(f"no tokenizer for {ckpt.path}: none of {tried} holds tokenizer.json; pass --tokenizer DIR")


def trainable_keys(cfg: Config, config) -> set[str]:
    """Names of the parameters the run trained: the model built on the meta device, frozen as the stage froze it."""
    from transformers import Blip2ForConditionalGeneration

    from expblip.model.lora import add_lora

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration._from_config(config)
        if cfg.model.lora.enabled:
            add_lora(model, cfg.model.lora, cfg.model.family)
    apply_freezing(model, cfg.model, cfg.train.stage)
    return {name for name, param in model.named_parameters() if param.requires_grad}


def consolidated(ckpt: Checkpoint) -> tuple[dict, list[str]]:
    """(the HF model's state, names of the other tensors) of a checkpoint, via DeepSpeed's zero_to_fp32.

    Every training unit keeps the HF model at `.blip2` (CaptionModel, Stage1Model, VisionPretrainModel), and that
    is what gets exported, as train.loop.export does; the stage heads beside it (stage-1 ITC/ITM/ITG, the vision
    stage's probe) are left out and named. Trainable tensors stay lazy until written. DeepSpeed prints its
    progress; it goes to stderr so that stdout stays the exporter's own.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.root), tag=ckpt.tag, lazy_mode=True)
    if not any(k.startswith(PREFIX) for k in state):  # a bare HF model was trained
        return dict(state), []
    return strip_prefix({k: v for k, v in state.items() if k.startswith(PREFIX)}), sorted(
        k for k in state if not k.startswith(PREFIX))


def model_config(cfg: Config, ckpt: Checkpoint, tokenizer):
    """(Blip2Config of the run's HF model, stage 1's Q-Former tokenizer or None), as the training loop built it."""
    config = blip2_config(cfg.model, tokenizer)
    if cfg.train.stage != "stage1":
        return config, None
    from expblip.model.stage1 import load_qformer_tokenizer, with_qformer_text

    weights = Path(cfg.model.weights) if cfg.model.weights else None
    candidates = [cfg.stage1.qformer_tokenizer, str(ckpt.path / "qformer_tokenizer"),
                  str(ckpt.run_dir / "qformer_tokenizer")]
    if weights is not None:
        candidates += [str(weights / "export" / "qformer_tokenizer"), str(weights / "qformer_tokenizer")]
    for candidate in candidates:
        if candidate and Path(candidate, "tokenizer.json").is_file():
            qformer_tokenizer = load_qformer_tokenizer(candidate)
            return with_qformer_text(config, qformer_tokenizer), qformer_tokenizer
    raise FileNotFoundError(f"no Q-Former tokenizer for the stage-1 checkpoint {ckpt.path}: none of "
                            f"{[c for c in candidates if c]} holds tokenizer.json")


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    step: int
    tensors: int  # of the HF model, tied aliases included
    trainable_only: bool
    heads: list[str]  # stage heads in the checkpoint that an HF-format model has no place for


def export_checkpoint(checkpoint_path: str | Path, out: str | Path, trainable_only: bool = False,
                      dtype: str = "float32", tokenizer_dir: str = "", overwrite: bool = False) -> ExportResult:
    """Consolidate one ZeRO checkpoint and write a full (or trainable-only) HF-format export to `out`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _check_out(out, overwrite)
    ckpt = resolve_checkpoint(checkpoint_path)
    cfg, yaml_text = run_config(ckpt)
    from expblip.model.spec import spec_for_preset

    if (family := spec_for_preset(cfg.model.preset).name) != "blip2":
        raise ConfigError(f"{ckpt.path}: a {family} run ({cfg.model.preset}); exporting its checkpoints is BLIP-2's "
                          "only so far. Its run wrote RUN_DIR/export when training ended (train.export=full): "
                          "use that, or resume the run to its end")
    tokenizer = find_tokenizer(cfg, ckpt, tokenizer_dir)
    config, qformer_tokenizer = model_config(cfg, ckpt, tokenizer)
    state, heads = consolidated(ckpt)
    state = with_frozen_towers(state, config, cfg)
    step = int(ckpt.tag.removeprefix("step")) if ckpt.tag.removeprefix("step").isdigit() else -1
    source = {"checkpoint": str(ckpt.path.resolve()), "step": step, "stage": cfg.train.stage,
              "preset": cfg.model.preset, "heads_not_exported": heads}
    meta = {"source": source, "tasks": cfg.tasks.prompts() if cfg.tasks.multi else {"describe": ""}}
    if cfg.model.lora.enabled:
        meta["lora"] = {**dataclasses.asdict(cfg.model.lora), "scale": cfg.model.lora.scale}
    if trainable_only:
        keys = trainable_keys(cfg, config)
        save_trainable_export(state, config, tokenizer, out, keys, yaml_text, meta)
    else:  # LoRA adapters folded into their layers: a plain Blip2 export
        save_hf_dir(merge_adapters(state, cfg.model.lora.scale), config, tokenizer, out, yaml_text, DTYPES[dtype],
                    meta)
    if qformer_tokenizer is not None:
        qformer_tokenizer.save_pretrained(Path(out) / "qformer_tokenizer")
    return ExportResult(Path(out), ckpt.path, step, len(state), trainable_only, heads)


def with_frozen_towers(state: dict, config, cfg: Config) -> dict:
    """The checkpoint's state, completed with the frozen towers it left out (checkpoint.save does when model.weights
    holds them): read lazily from model.weights, one tensor at a time as they are written or hashed."""
    from expblip.model.lora import base_name, is_adapter
    from expblip.model.weights import expected_shapes, open_towers

    absent = sorted(set(expected_shapes(config)) - {base_name(k) for k in state if not is_adapter(k)})
    if not absent or not cfg.model.has_weights:
        return state
    m = cfg.model
    source = open_towers(m.weights, m.vision_weights, m.lm_weights)
    lost = [k for k in absent if k not in source]
    if lost:
        raise FileNotFoundError(f"the checkpoint leaves out {len(absent)} frozen tensors and the initial weights "
                                f"{m.weights_id} lack {lost[:4]}; they must be the run's initial weights")
    return {**state, **{k: source.lazy(k) for k in absent}}


def _check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse to write over an export unless asked; when asked, drop its weight files (shard counts may differ)."""
    if not Path(out, "config.json").is_file():
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds an export; choose another directory or pass --overwrite")
    for old in [*Path(out).glob("*.safetensors"), *Path(out).glob("*.safetensors.index.json")]:
        old.unlink()


def merge_export(trainable_dir: str | Path, towers: str | Path, out: str | Path, dtype: str = "float32",
                 allow_pickle: bool = False, overwrite: bool = False, vision: str = "", lm: str = "") -> Path:
    """A full export from a trainable-only export and the frozen towers it was trained on (fingerprints checked):
    `towers` (model.weights), with `vision` / `lm` as the run's model.vision_weights / model.lm_weights."""
    from transformers import Blip2Config

    trainable_dir = Path(trainable_dir)
    _, meta = read_trainable_export(trainable_dir)
    _check_out(out, overwrite)
    source = open_towers(str(towers or ""), vision, lm, allow_pickle)
    state = merge_trainable(trainable_dir, source)  # the towers stream, one tensor at a time
    config = Blip2Config.from_pretrained(str(trainable_dir), local_files_only=True)
    yaml_file = trainable_dir / "config.yaml"
    yaml_text = yaml_file.read_text() if yaml_file.is_file() else ""
    extra = {"source": meta.get("source", {}), "merged_from": {"trainable": str(trainable_dir.resolve()),
                                                                "towers": source.where}}
    return save_hf_dir(state, config, load_tokenizer(trainable_dir), out, yaml_text, DTYPES[dtype], extra)
