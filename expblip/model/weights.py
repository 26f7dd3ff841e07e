"""Weights in and out: HF-format export directories that stock transformers loads, and their import.

An export directory holds model.safetensors + config.json (Blip2ForConditionalGeneration.save_pretrained),
generation_config.json (the paper's decoding: 5 beams, the caption end token), the tokenizer (BOS added as OPT's
tokenizer does), processor_config.json + chat_template.jinja (Blip2Processor: image size, CLIP mean/std, bicubic,
num_query_tokens), `expblip.json` (the same facts for expblip's own reader) and the run's resolved config as
`config.yaml`. Stock transformers describes a face from it with no expblip import:

    processor = Blip2Processor.from_pretrained(export)
    model = Blip2ForConditionalGeneration.from_pretrained(export)
    caption = processor.decode(model.generate(**processor(images=face, return_tensors="pt"))[0],
                               skip_special_tokens=True).strip()

Only safe formats are read by default (safetensors; `torch.load(weights_only=True)`).

    state = import_hf_dir("Salesforce/blip2-opt-6.7b")           # a local copy of a public HF repo
    state = import_lavis("blip2_pretrained.pth")                 # LAVIS names -> transformers' Blip2 names
    report = load_into_model(model, state)                       # KeyReport; print(report.summary())

    save_hf_dir(state, config, tokenizer, out)                   # full export, sharded safetensors
    save_trainable_export(state, config, tokenizer, out, trainable)   # Q-Former (+ ...) + frozen-tower fingerprints
    model, tokenizer, meta = load_trainable_export(out, towers="exports/initial")

Key names are transformers' (`vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`,
`language_model.*`); the `blip2.` prefix of CaptionModel's state dict is stripped on the way in. Stage-1 weights
that Blip2ForConditionalGeneration has no place for keep the names of Blip2ForImageTextRetrieval (`embeddings.*`,
`vision_projection.*`, `text_projection.*`, `itm_head.*`, the Q-Former's text FFN `qformer.encoder.layer.N.
intermediate|output.*`) or, where transformers has none, `lavis.<original name>` (`lavis.temp`,
`lavis.Qformer.cls.*`), and are reported as extras, not as junk.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

from expblip.model.family import OPT, Family
from expblip.model.tokenizer import caption_end_id, family_of_tokenizer, load_tokenizer
from expblip.pixels import CLIP_MEAN, CLIP_STD

PREFIX = "blip2."  # CaptionModel wraps the HF model under this attribute
TRAINABLE_FILE = "trainable.safetensors"
KEEP_FP32 = ("qformer.", "query_tokens")  # Blip2ForConditionalGeneration._keep_in_fp32_modules


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def export_hf(state: dict[str, torch.Tensor], config: Blip2Config, tokenizer, out: str | Path,
              resolved_config_yaml: str = "") -> Path:
    """Write an HF-format BLIP-2 directory from a full (consolidated) state dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Blip2ForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(strip_prefix(state), strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ValueError(f"export to {out}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.save_pretrained(out)
    _generation_config(config, tokenizer).save_pretrained(out)  # replaces save_pretrained's copy of the defaults
    _write_side_files(out, config, tokenizer, resolved_config_yaml, {})
    return out


def processor_meta(config: Blip2Config, tokenizer) -> dict:
    """What a reader needs besides the weights: preprocessing and the generation end token (expblip.json)."""
    return {"image_size": config.vision_config.image_size, "mean": CLIP_MEAN, "std": CLIP_STD,
            "caption_end_id": caption_end_id(tokenizer), "num_query_tokens": config.num_query_tokens}


def _is_tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and model.config.text_config.tie_word_embeddings


def load_export(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """(model in eval mode, tokenizer, meta) from an export directory.

    Each tensor is read (memory-mapped) and cast to `dtype` as it is loaded, straight onto `device` when given
    (transformers' device_map): a bf16 load of a 7.7 B export never holds an fp32 copy, nor a host copy for a GPU.
    The family (expblip.model.spec) is the one config.json names; it decides what stays in fp32.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an expblip export (no config.json); pass RUN_DIR/export "
                                "or the --out of launch/export.py")
    meta = json.loads((path / "expblip.json").read_text()) if (path / "expblip.json").is_file() else {}
    if meta.get("format") == "trainable-only":
        raise ValueError(f"{path} is a trainable-only export (no frozen towers); merge it onto its towers: "
                         f"python launch/export.py --merge {path} --towers TOWERS_DIR --out DIR")
    from expblip.model.spec import spec_for_config

    spec = spec_for_config(json.loads((path / "config.json").read_text()))
    placement = {"device_map": str(device)} if device is not None and torch.device(device).type != "cpu" else {}
    return spec.load_pretrained(path, dtype, placement).eval(), spec.load_tokenizer(path), meta


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an export directory as a state dict (safetensors only)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


# ---------------------------------------------------------------- safe reading


class UnsafeCheckpointError(ValueError):
    """A .pth/.bin file that holds more than tensors and plain containers (a pickle that could run code)."""


def load_torch_file(path: str | Path, allow_pickle: bool = False) -> Any:
    """torch.load on the CPU with weights_only=True (tensors, dicts, lists, numbers, strings) unless allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} holds pickled objects other than tensors ({str(err).splitlines()[0]}); it was refused "
            "because unpickling can run arbitrary code. Convert it to safetensors, or pass allow_pickle=True "
            "(--allow-pickle) only for a file from a source you trust") from err


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: LAVIS {"model": ...}, {"state_dict": ...} or the dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (keys: {list(obj)[:8]})")
    return tensors


# ---------------------------------------------------------------- HF-format directories


def import_hf_dir(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an HF-format BLIP-2 directory (config.json + model.safetensors or shards with an index).

    The layout of the public Salesforce/blip2-opt-6.7b, blip2-opt-2.7b and blip2-itm-vit-g repositories:
    `model.safetensors.index.json` maps every tensor to its shard and every shard it names must be present.
    Falls back to `pytorch_model*.bin` (read with weights_only=True) when there is no safetensors file.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF-format model directory (no config.json)")
    for index_name, loader in (("model.safetensors.index.json", _safetensors),
                               ("pytorch_model.bin.index.json", lambda f: _torch_state(f, allow_pickle))):
        if (path / index_name).is_file():
            return _read_sharded(path, index_name, loader)
    if (path / "model.safetensors").is_file():
        return _safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return _torch_state(path / "pytorch_model.bin", allow_pickle)
    raise FileNotFoundError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _torch_state(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    return _tensor_dict(load_torch_file(file, allow_pickle), file)


def _read_sharded(path: Path, index_name: str, loader: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    weight_map: dict[str, str] = json.loads((path / index_name).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{path / index_name} names shards that are not there: {absent}; "
                                "download the complete repository")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(loader(path / shard))
    lost = sorted(set(weight_map) - set(state))
    if lost:
        raise ValueError(f"{path}: the index lists {len(lost)} tensors that no shard holds, e.g. {lost[:3]}")
    return state


# ---------------------------------------------------------------- LAVIS checkpoints

# LAVIS name -> transformers name, applied in order to every key (the first match wins). After
# transformers' convert_blip_2_original_to_pytorch.py; EVA's q_bias / v_bias are merged by _merge_qv_bias.
LAVIS_RULES: list[tuple[str, str]] = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),  # stage-1 text
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),  # attention.output, intermediate(_query), output(_query)
    (r"^Qformer\.cls\.", "lavis.Qformer.cls."),  # stage-1 ITG head: no place in transformers' Blip2
    (r"^temp$", "lavis.temp"),  # stage-1 ITC temperature
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^(opt|t5)_proj\.", "language_projection."),
    (r"^(opt|t5)_model\.", "language_model."),
]
_LAVIS_DROPPED = re.compile(r"^Qformer\.bert\.embeddings\.position_ids$")  # a non-persistent buffer in transformers
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")
STAGE1_EXTRAS = re.compile(r"^(embeddings\.|vision_projection\.|text_projection\.|itm_head\.|lavis\.|"
                           r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)")


def lavis_name(key: str) -> str:
    """The transformers name of one LAVIS key (unknown keys are returned unchanged)."""
    for pattern, replacement in LAVIS_RULES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def lavis_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS BLIP-2 state dict to transformers' Blip2 names (q/v biases merged into the qkv bias)."""
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from a DDP-wrapped model
        if _LAVIS_DROPPED.match(key):
            continue
        qv = _QV_BIAS.match(key)
        if qv:
            biases.setdefault(qv.group(1), {})[qv.group(2)] = value
        else:
            out[lavis_name(key)] = value
    out.update(_merge_qv_bias(biases))
    return out


def _merge_qv_bias(biases: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """EVA keeps q and v biases (k has none); transformers holds one qkv bias = [q, 0, v]."""
    merged = {}
    for layer, qv in biases.items():
        if set(qv) != {"q", "v"}:
            raise ValueError(f"visual_encoder.blocks.{layer}.attn has only its {set(qv)} bias; q_bias and v_bias "
                             "must come together")
        merged[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat(
            (qv["q"], torch.zeros_like(qv["v"]), qv["v"]))
    return merged


def import_lavis(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A LAVIS BLIP-2 checkpoint ({"model": state_dict} .pth, or .safetensors) in transformers' names.

    Reads BLIP-2 stage-1 weights (Q-Former + ITC/ITM/ITG heads), BLIP-2 OPT weights and the Exp-BLIP trimmed
    checkpoints that hold only the trained parameters; load the result with load_into_model and read its report.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = _safetensors(path)
    else:
        state = _tensor_dict(load_torch_file(path, allow_pickle), path)
    return lavis_to_hf(state)


# ---------------------------------------------------------------- streaming sources


class LazyTensor:
    """One tensor of a WeightSource, read only when asked: `.shape`, `.dtype`, `.contiguous()` (a whole copy),
    `.fingerprint(dtype)` (streamed). What write_safetensors and save_hf_dir accept in place of a tensor."""

    def __init__(self, source: WeightSource, name: str):
        self.source, self.name = source, name
        self.shape = torch.Size(source.entries[name].shape)
        self.dtype = source.entries[name].dtype

    def contiguous(self) -> torch.Tensor:
        return self.source.tensor(self.name)

    def fingerprint(self, dtype: torch.dtype | None = None) -> str:
        return self.source.fingerprint(self.name, dtype)


@dataclass
class Entry:
    """How to read one tensor: a byte range of a safetensors file, a (memory-mapped) tensor, or a composition."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""  # safetensors file (path in the source's filesystem)
    meta: Any = None  # its tensorio.TensorMeta
    tensor: torch.Tensor | None = None  # from a torch file, loaded with mmap=True
    compose: Callable[[WeightSource], torch.Tensor] | None = None  # e.g. EVA's q/v biases -> one qkv bias


class WeightSource:
    """The tensors of `model.weights` in transformers' names, read one at a time or one slice at a time.

        source = open_weights("s3://bucket/blip2-opt-6.7b")      # or an HF dir, export, run dir, LAVIS .pth
        source.shapes()                                           # {name: shape}: headers only, nothing read
        for offset, chunk in source.read("query_tokens", start, stop):   # flat elements [start, stop)
            ...
        source.close()

    Reading holds one chunk (tensorio.CHUNK_BYTES) at a time; the caller copies it where it belongs (a ZeRO-3
    partition, a parameter, a hash).
    """

    def __init__(self, where: str, fs, entries: dict[str, Entry], kind: str, directory: str = ""):
        from expblip.model.tensorio import MappedFiles

        self.where, self.fs, self.entries, self.kind, self.directory = where, fs, entries, kind, directory
        self._maps = MappedFiles()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset from start, 1-D chunk) over flat elements [start, stop) of `name`, in the stored dtype."""
        from expblip.model.tensorio import CHUNK_BYTES, read_range

        entry = self.entries[name]
        if entry.meta is not None:
            yield from read_range(self.fs, entry.file, entry.meta, start, stop, self._maps)
            return
        flat = self.entry_tensor(entry).reshape(-1)
        stop = flat.numel() if stop is None else min(stop, flat.numel())
        step = max(1, CHUNK_BYTES // entry.dtype.itemsize)
        for first in range(start, stop, step):
            yield first - start, flat[first : min(stop, first + step)]

    def tensor(self, name: str) -> torch.Tensor:
        """A whole tensor in its own memory."""
        entry = self.entries[name]
        out = torch.empty(_numel(entry.shape), dtype=entry.dtype)
        for offset, chunk in self.read(name):
            out[offset : offset + chunk.numel()].copy_(chunk)
        return out.reshape(entry.shape)

    def entry_tensor(self, entry: Entry) -> torch.Tensor:
        """The whole tensor of an entry (a copy for safetensors, the mapped tensor itself for torch files)."""
        from expblip.model.tensorio import read_tensor

        if entry.meta is not None:
            return read_tensor(self.fs, entry.file, entry.meta, self._maps)
        return entry.tensor if entry.tensor is not None else entry.compose(self)

    def lazy(self, name: str) -> LazyTensor:
        return LazyTensor(self, name)

    def fingerprint(self, name: str, dtype: torch.dtype | None = None) -> str:
        """fingerprint() of the tensor, streamed chunk by chunk (same digest as hashing it whole)."""
        entry = self.entries[name]
        digest = hashlib.sha256(repr(tuple(entry.shape)).encode())
        for _, chunk in self.read(name):
            digest.update(memoryview(chunk.to(dtype or chunk.dtype).contiguous().view(torch.uint8).numpy()))
        return digest.hexdigest()

    def side_file(self, name: str) -> bytes | None:
        """A small file beside the weights (config.json, tokenizer.json, ...), or None."""
        if not self.directory:
            return None
        path = f"{self.directory.rstrip('/')}/{name}"
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def close(self) -> None:
        self._maps.close()


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
_LAVIS_PREFIXES = ("visual_encoder.", "Qformer.", "opt_model.", "opt_proj.", "t5_model.", "t5_proj.", "ln_vision.")


def open_weights(path: str | Path, allow_pickle: bool = False, key: str = "model.weights") -> WeightSource:
    """A WeightSource over any accepted `model.weights`: an HF-format directory (single or sharded safetensors, or
    pytorch_model*.bin), an expblip export, a run directory (its export/), a LAVIS .pth/.safetensors file; local
    paths or fsspec URLs (s3://bucket/dir). Only headers are read here."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    where = str(path)
    fs, root = url_to_fs(where) if "://" in where else (LocalFileSystem(), str(Path(where).resolve()))
    if fs.isdir(root) and fs.isfile(f"{root}/export/config.json"):
        root = f"{root}/export"  # a run directory
    if fs.isdir(root):
        return _open_directory(where, fs, root, allow_pickle)
    if not fs.isfile(root):
        raise FileNotFoundError(f"{key} {where} does not exist; give an HF-format or export directory, a run "
                                "directory, or a LAVIS .pth file (local or s3://)")
    return _open_file(where, fs, root, allow_pickle)


def _open_directory(where: str, fs, root: str, allow_pickle: bool) -> WeightSource:
    meta = json.loads(fs.cat_file(f"{root}/expblip.json")) if fs.isfile(f"{root}/expblip.json") else {}
    if meta.get("format") == "trainable-only":
        raise ValueError(f"{where} is a trainable-only export (no frozen towers); merge it onto its towers first: "
                         f"python launch/export.py --merge {where} --towers TOWERS_DIR --out DIR")
    found = [name for name in WEIGHT_FILES if fs.isfile(f"{root}/{name}")]
    if not found:
        raise FileNotFoundError(f"{where} holds none of {', '.join(WEIGHT_FILES)}; give an HF-format model directory")
    name = found[0]
    if name.endswith(".index.json"):
        weight_map: dict[str, str] = json.loads(fs.cat_file(f"{root}/{name}"))["weight_map"]
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not fs.isfile(f"{root}/{s}")]
        if absent:
            raise FileNotFoundError(f"{where}/{name} names shards that are not there: {absent}; "
                                    "download the complete repository")
        entries: dict[str, Entry] = {}
        for shard in shards:
            entries.update(_file_entries(fs, f"{root}/{shard}", allow_pickle))
        lost = sorted(set(weight_map) - set(entries))
        if lost:
            raise ValueError(f"{where}: the index lists {len(lost)} tensors that no shard holds, e.g. {lost[:3]}")
    else:
        entries = _file_entries(fs, f"{root}/{name}", allow_pickle)
    return WeightSource(where, fs, _renamed(entries), "hf", root)


def _open_file(where: str, fs, root: str, allow_pickle: bool) -> WeightSource:
    entries = _file_entries(fs, root, allow_pickle)
    kind = "lavis" if any(k.removeprefix("module.").startswith(_LAVIS_PREFIXES) for k in entries) else "file"
    return WeightSource(where, fs, _renamed(entries), kind)


def _file_entries(fs, path: str, allow_pickle: bool) -> dict[str, Entry]:
    from expblip.model.tensorio import is_local, read_header

    if path.endswith(".safetensors"):
        return {k: Entry(m.shape, m.dtype, file=path, meta=m) for k, m in read_header(fs, path).items()}
    if not is_local(fs):
        raise ValueError(f"{path}: only safetensors can be streamed from remote storage; convert it, or copy it "
                         "to local disk")
    tensors = _tensor_dict(_load_torch_mmap(Path(path), allow_pickle), Path(path))
    return {k: Entry(tuple(v.shape), v.dtype, tensor=v) for k, v in tensors.items()}


def _load_torch_mmap(path: Path, allow_pickle: bool) -> Any:
    """torch.load memory-mapped (pages are read as tensors are touched), or plainly for the legacy format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return load_torch_file(path, allow_pickle)


def _renamed(entries: dict[str, Entry]) -> dict[str, Entry]:
    """transformers' names: prefixes `module.` / `blip2.` dropped, LAVIS names converted, EVA q/v biases merged."""
    entries = {k.removeprefix("module.").removeprefix(PREFIX): e for k, e in entries.items()}
    if _is_bare_eva(entries):  # EVA's own eva_vit_g.pth, which LAVIS loads into visual_encoder
        entries = {f"visual_encoder.{k}": e for k, e in entries.items()}
    if not any(k.startswith(_LAVIS_PREFIXES) for k in entries):
        return entries
    out: dict[str, Entry] = {}
    biases: dict[str, dict[str, str]] = {}
    raw = dict(entries)
    for key, entry in entries.items():
        if _LAVIS_DROPPED.match(key):
            continue
        qv = _QV_BIAS.match(key)
        if qv:
            biases.setdefault(qv.group(1), {})[qv.group(2)] = key
        else:
            out[lavis_name(key)] = entry
    for layer, names in biases.items():
        if set(names) != {"q", "v"}:
            raise ValueError(f"visual_encoder.blocks.{layer}.attn has only its {set(names)} bias; q_bias and v_bias "
                             "must come together")
        q, v = raw[names["q"]], raw[names["v"]]
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = Entry(
            (q.shape[0] * 3,), q.dtype, compose=_qkv_bias(q, v))
    return out


def _is_bare_eva(entries: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in entries and any(k.startswith("blocks.") for k in entries)


def _qkv_bias(q: Entry, v: Entry) -> Callable[[WeightSource], torch.Tensor]:
    def compose(source: WeightSource) -> torch.Tensor:
        qt, vt = source.entry_tensor(q), source.entry_tensor(v)
        return torch.cat((qt.reshape(-1), torch.zeros(vt.numel(), dtype=vt.dtype), vt.reshape(-1)))

    return compose


# ---------------------------------------------------------------- towers from separate sources

VISION_PREFIX, LM_PREFIX = "vision_model.", "language_model."
_LM_PARTS = (LM_PREFIX, "language_projection.")  # what a separate LM replaces: its weights, and the projection into it


class TowerSources(WeightSource):
    """One WeightSource over model.weights with towers taken from their own sources, in transformers' names:

        open_towers("blip2-opt-6.7b", vision="", lm="Qwen2.5-7B-Instruct")
        # vision_model.*, qformer.*, query_tokens from the BLIP-2 release; language_model.* from Qwen's directory;
        # no language_projection (it maps into OPT's space): a new one starts (model.allow_missing)

    `vision`: any source holding a BLIP-2 ViT (an HF BLIP-2 directory, a LAVIS .pth, EVA's eva_vit_g.pth); only its
    vision_model.* are taken. `lm`: a causal LM saved by transformers (`save_pretrained` of Qwen2ForCausalLM,
    LlamaForCausalLM, OPTForCausalLM; sharded safetensors as published) or a BLIP-2 directory (its language_model.*);
    its tensors land under language_model.*. What each source holds beyond its tower is left out and listed in
    `unused`. Reading delegates to the source that holds a tensor (each may be local or s3://)."""

    def __init__(self, where: str, base: WeightSource | None, vision: WeightSource | None, lm: WeightSource | None):
        self.parts: dict[str, tuple[WeightSource, str]] = {}
        self.unused: dict[str, list[str]] = {}
        if base is not None:  # all of it but the towers given on their own
            replaced = (VISION_PREFIX,) * (vision is not None) + _LM_PARTS * (lm is not None)
            self._take(base, {k: k for k in base.entries if not k.startswith(replaced)})
        if vision is not None:
            self._take(vision, {k: k for k in vision.entries if k.startswith(VISION_PREFIX)})
        if lm is not None:
            self._take(lm, lm_names(lm.entries))
        self.sources = [s for s in (base, vision, lm) if s is not None]
        home = lm or base or vision  # side files (the tokenizer) come from the LM's directory when it has its own
        super().__init__(where, home.fs, {k: src.entries[sub] for k, (src, sub) in self.parts.items()}, "towers",
                         home.directory)

    def _take(self, source: WeightSource, names: dict[str, str]) -> None:
        """names: our name -> the source's name."""
        self.parts.update({ours: (source, theirs) for ours, theirs in names.items()})
        unused = sorted(set(source.entries) - set(names.values()))
        if unused:
            self.unused[source.where] = unused

    def read(self, name: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        source, theirs = self.parts[name]
        yield from source.read(theirs, start, stop)

    def close(self) -> None:
        for source in self.sources:
            source.close()


def lm_names(entries: Mapping[str, Any]) -> dict[str, str]:
    """language_model.* name -> the LM source's name: a BLIP-2 source's language_model.* as they are; a causal LM's
    own names (`model.*`, `lm_head.*`) under language_model.; a base-model save without the `model.` prefix (OPT's
    original `decoder.*`) gets it, as transformers does when it loads one."""
    if any(k.startswith(LM_PREFIX) for k in entries):
        return {k: k for k in entries if k.startswith(LM_PREFIX)}
    bare = not any(k.startswith("model.") for k in entries)
    return {LM_PREFIX + (k if not bare or k.startswith("lm_head.") else f"model.{k}"): k for k in entries}


def towers_label(weights: str = "", vision: str = "", lm: str = "") -> str:
    """Where the initial weights come from, in one string: model.weights alone, or every source by its key."""
    if not vision and not lm:
        return weights
    return " + ".join(f"{key}={path}" for key, path in (("weights", weights), ("vision_weights", vision),
                                                       ("lm_weights", lm)) if path)


def open_towers(weights: str = "", vision: str = "", lm: str = "", allow_pickle: bool = False) -> WeightSource:
    """model.weights, or (model.vision_weights / model.lm_weights given) a TowerSources over all of them."""
    if not vision and not lm:
        return open_weights(weights, allow_pickle)
    base, v, m = (open_weights(p, allow_pickle, key) if p else None for p, key in (
        (weights, "model.weights"), (vision, "model.vision_weights"), (lm, "model.lm_weights")))
    return TowerSources(towers_label(weights, vision, lm), base, v, m)


def read_lm_config(path: str) -> dict:
    """config.json of a causal-LM directory (local or s3://), or of a BLIP-2 directory's text_config."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(str(path))
    file = f"{root.rstrip('/')}/config.json"
    if not fs.isfile(file):
        raise FileNotFoundError(f"model.lm_weights {path} has no config.json; give the LM's directory as "
                                "save_pretrained wrote it (config.json + safetensors)")
    config = json.loads(fs.cat_file(file))
    return config.get("text_config", config) if config.get("model_type") == "blip-2" else config


# ---------------------------------------------------------------- loading with a key report


@dataclass
class KeyReport:
    """What load_into_model did with each key (transformers' names)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model has it, the state does not
    unexpected: list[str] = field(default_factory=list)  # the state has it, the model does not (not a stage-1 head)
    mismatched_shapes: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, state's, model's)
    extras: list[str] = field(default_factory=list)  # stage-1 heads the model has no place for

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched_shapes)

    def summary(self, limit: int = 6) -> str:
        """A few readable lines: counts, then the first keys of each kind, grouped by tower."""
        total = len(self.loaded) + len(self.missing)
        lines = [f"loaded {len(self.loaded)} of the model's {total} tensors"]
        for label, keys in (("missing (kept as initialised)", self.missing), ("unexpected (ignored)", self.unexpected),
                            ("stage-1 extras (ignored)", self.extras)):
            if keys:
                lines.append(f"{label}: {len(keys)} [{_towers(keys)}] e.g. {', '.join(keys[:limit])}")
        for key, theirs, ours in self.mismatched_shapes[:limit]:
            lines.append(f"shape mismatch (not loaded): {key} is {list(theirs)} in the state, {list(ours)} in the model")
        if len(self.mismatched_shapes) > limit:
            lines.append(f"... {len(self.mismatched_shapes) - limit} more shape mismatches")
        return "\n".join(lines)


def _towers(keys: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        tower = k.split(".")[0] if not k.startswith("lavis.") else "lavis"
        counts[tower] = counts.get(tower, 0) + 1
    return ", ".join(f"{t} {n}" for t, n in counts.items())


def _unwrap(model: nn.Module) -> nn.Module:
    """The Blip2ForConditionalGeneration inside a CaptionModel (or the model itself)."""
    inner = getattr(model, "blip2", None)
    return inner if isinstance(inner, nn.Module) else model


def load_into_model(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = False) -> KeyReport:
    """Copy `state` into `model` (a Blip2 model or a CaptionModel) key by key; returns what happened.

    Shapes must match exactly (mismatches are reported and skipped); values are cast to the parameter's dtype.
    A key tied to another (OPT's lm_head and embed_tokens) counts as loaded when either is. `strict` raises
    ValueError with the summary when anything is missing, unexpected or mismatched (extras are fine).
    """
    target = _unwrap(model)
    own = target.state_dict(keep_vars=True)
    state = strip_prefix(dict(state))
    report = KeyReport()
    done: set[int] = set()
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                (report.extras if STAGE1_EXTRAS.match(key) else report.unexpected).append(key)
            elif tuple(value.shape) != tuple(own[key].shape):
                report.mismatched_shapes.append((key, tuple(value.shape), tuple(own[key].shape)))
            else:
                own[key].copy_(value if torch.is_tensor(value) else value.contiguous())  # a lazy tensor: read now
                report.loaded.append(key)
                done.add(id(own[key]))
    report.missing = [k for k, t in own.items() if k not in state and id(t) not in done]
    report.loaded += [k for k, t in own.items() if k not in state and id(t) in done]  # tied aliases
    if strict and not report.ok:
        raise ValueError(f"weights do not fit the model:\n{report.summary()}")
    return report


# ---------------------------------------------------------------- writing HF-format directories


def _meta_model(config) -> nn.Module:
    """The config's HF model (its family's architecture) on the meta device: shapes and names, no memory."""
    import transformers

    from expblip.model.spec import spec_for_config

    with torch.device("meta"):
        return getattr(transformers, spec_for_config(config).architecture)(config)


def tied_aliases(config) -> dict[str, str]:
    """alias -> source for parameters that are one tensor (built on the meta device: no memory)."""
    return _aliases(_meta_model(config))


def _aliases(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Persistent tensors of the config's HF model (its family's architecture) and their shapes, tied aliases
    left out."""
    model = _meta_model(config)
    aliases = _aliases(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def check_state(state: Mapping[str, Any], config, where: str) -> None:
    """Raise ValueError unless `state` (tied aliases removed) has exactly the model's keys and shapes."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), expected[k]) for k in expected if k in state
             and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: the weights do not fit the model config: missing {len(missing)} {missing[:4]}, "
                         f"unexpected {len(unexpected)} {unexpected[:4]}, wrong shapes {wrong[:3]}")


def write_safetensors(state: Mapping[str, Any], out: Path, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 5 * 10**9, name: str = "model") -> list[str]:
    """Write `state` as name.safetensors, or shards name-0000i-of-0000n.safetensors + index when larger.

    Values may be lazy (anything with .shape, .dtype and .contiguous(): DeepSpeed's GatheredTensor, a
    WeightSource's LazyTensor): each is materialised only while it is written (expblip.model.tensorio), so the
    memory needed is one tensor's, whatever the shard size.
    """
    from expblip.model.tensorio import Planned, plan_shards, write_file

    items = [Planned(k, _out_dtype(k, v.dtype, dtype), tuple(v.shape), _producer(v)) for k, v in state.items()]
    shards = plan_shards(items, max_shard_bytes)
    files = ([f"{name}.safetensors"] if len(shards) == 1 else
             [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(write_file(out / file, group) for file, group in zip(files, shards, strict=True))
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {item.name: f for f, group in zip(files, shards, strict=True) for item in group}}
        (out / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def _out_dtype(key: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not stored.is_floating_point or key.startswith(KEEP_FP32):
        return stored
    return dtype


def _producer(value) -> Callable[[], torch.Tensor]:
    return lambda: value.contiguous()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def save_hf_dir(state: Mapping[str, Any], config: Blip2Config, tokenizer, out: str | Path,
                resolved_config_yaml: str = "", dtype: torch.dtype | None = None, extra_meta: dict | None = None,
                max_shard_bytes: int = 5 * 10**9, config_dtype: torch.dtype | None = None) -> Path:
    """Full HF-format export that stock Blip2ForConditionalGeneration.from_pretrained loads.

    Unlike export_hf it builds no model (the key check runs on the meta device) and streams lazy tensors shard
    by shard, so a 7.7B-parameter export needs little more memory than the state itself. `dtype` casts floating
    tensors except the Q-Former and query tokens, which stay fp32 (small; load_export keeps them fp32 too).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(config)
    state = {k: v for k, v in strip_prefix(dict(state)).items() if k not in aliases}
    check_state(state, config, f"export to {out}")
    write_safetensors(state, out, dtype, max_shard_bytes)
    config = Blip2Config.from_dict(config.to_dict())  # a copy: the caller's config is left alone
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.dtype = str(dtype or config_dtype or torch.float32).removeprefix("torch.")
    config.save_pretrained(out)
    _generation_config(config, tokenizer).save_pretrained(out)
    _write_side_files(out, config, tokenizer, resolved_config_yaml, {"format": "full", **(extra_meta or {})})
    return out


def _generation_config(config: Blip2Config, tokenizer) -> GenerationConfig:
    """The paper's decoding as generate()'s defaults: 5 beams, ends at "\\n" (Captioner's GenerationConfig)."""
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=caption_end_id(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, num_beams=5, max_new_tokens=60, min_new_tokens=3)


def _write_side_files(out: Path, config: Blip2Config, tokenizer, resolved_config_yaml: str, meta: dict) -> None:
    write_processor(out, config, tokenizer)
    (out / "expblip.json").write_text(json.dumps({**processor_meta(config, tokenizer), **meta}, indent=2))
    if resolved_config_yaml:
        (out / "config.yaml").write_text(resolved_config_yaml)


# The prompt of a chat turn for stock transformers (Blip2Processor.apply_chat_template, the image-text-to-text
# pipeline, engines that read chat_template.jinja): BOS, then the text parts of the user's messages laid out as the
# LM family's turn (expblip.model.family; OPT's is the text itself), nothing for an image alone. The processor puts
# num_query_tokens <image> tokens in front, so an image-only message gives exactly expblip's prompt ([<image>] * Q +
# BOS); Exp-BLIP models were trained with that empty prompt, task-prompted models with the family's turn.
_CHAT_TEXT = (
    "{% set ns = namespace(text='') %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{% set ns.text = ns.text + message['content'] %}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}"
    "{% endif %}{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def chat_template(family: Family) -> str:
    """The exported chat template of a family (see above)."""
    before, _, after = family.turn.partition("{prompt}")
    bos = "{{ bos_token }}" if family.bos else ""
    turn = "{{ ns.text }}" if not before and not after else f"{_jinja_text(before)}{{{{ ns.text }}}}{_jinja_text(after)}"
    return f"{_CHAT_TEXT}{bos}{{% if ns.text %}}{turn}{{% endif %}}"


def _jinja_text(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}" if text else ""


CHAT_TEMPLATE = chat_template(OPT)


def write_processor(out: Path, config: Blip2Config, tokenizer) -> None:
    """The tokenizer, processor_config.json and chat_template.jinja: what Blip2Processor.from_pretrained(out) and
    pipeline("image-text-to-text", model=out) read.

    Two fixes to the saved tokenizer, for Blip2Processor in transformers 5.24: ``image_token`` is dropped from
    tokenizer_config.json (the processor takes a tokenizer's ``image_token`` for an AddedToken and reads its
    ``.content``, which a plain string has not; without it the processor uses the vocabulary's own ``<image>``), and
    the tokenizer adds BOS (``</s>``) in front of text, as OPT's own tokenizer does, so that a text prompt gets the
    prompt the model was trained with. expblip itself always tokenises with add_special_tokens=False.
    """
    import tempfile

    from transformers import AutoTokenizer, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer.save_pretrained(out)
    family = family_of_tokenizer(tokenizer)
    _tokenizer_for_processor(out, family.bos, tokenizer.convert_tokens_to_ids(family.bos) if family.bos else None)
    size = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN),
                                            image_std=list(CLIP_STD), resample=3, do_convert_rgb=True)  # 3: bicubic
    processor = Blip2Processor(image_processor=image_processor, num_query_tokens=config.num_query_tokens,
                               tokenizer=AutoTokenizer.from_pretrained(str(out), local_files_only=True))
    processor.chat_template = chat_template(family)  # Blip2Processor.__init__ drops a chat_template argument (5.24)
    with tempfile.TemporaryDirectory() as tmp:  # keep our tokenizer files; take the processor's own two
        processor.save_pretrained(tmp)
        for name in ("processor_config.json", "chat_template.jinja"):
            (out / name).write_bytes((Path(tmp) / name).read_bytes())


def _tokenizer_for_processor(out: Path, bos: str | None, bos_id: int | None) -> None:
    """Edit the saved tokenizer files in ``out`` (see write_processor): no ``image_token``; BOS in front of text
    (none for a family without one: Qwen2.5)."""
    from tokenizers import Tokenizer, processors

    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config.pop("image_token", None)
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        if isinstance(tok_config.get(key), dict):
            tok_config[key].pop("image_token", None)
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    tok_file = out / "tokenizer.json"
    if not tok_file.is_file() or bos is None:  # a slow tokenizer, or no BOS: left as it is
        return
    backend = Tokenizer.from_file(str(tok_file))
    if backend.encode("a").ids[:1] == [bos_id]:  # OPT's own tokenizer already adds it
        return
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, bos_id)])
    old = backend.post_processor
    backend.post_processor = processors.Sequence([old, template]) if old is not None else template
    backend.save(str(tok_file))


# ---------------------------------------------------------------- trainable-only exports


class TowerMismatchError(ValueError):
    """Frozen towers that are not the ones a trainable-only export was trained on."""


def fingerprint(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """sha256 of the tensor's shape and bytes, after casting to `dtype` (the dtype the run held it in)."""
    if isinstance(tensor, LazyTensor):
        return tensor.fingerprint(dtype)
    t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    digest = hashlib.sha256(repr(tuple(t.shape)).encode())
    digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_trainable_export(state: Mapping[str, Any], config: Blip2Config, tokenizer, out: str | Path,
                          trainable: Iterable[str], resolved_config_yaml: str = "",
                          extra_meta: dict | None = None, frozen: dict[str, dict] | None = None) -> Path:
    """A small export: the trained tensors (`trainable`, e.g. Q-Former, query tokens, projection) in fp32, and a
    sha256 fingerprint of every frozen tensor they were trained with, so merging onto other towers is refused.

    Holds trainable.safetensors, config.json (the full Blip2Config), the tokenizer, config.yaml and expblip.json
    ({"format": "trainable-only", "frozen": {key: {"sha256", "dtype", "shape"}}, ...}).
    `frozen`: those fingerprints already computed (the training loop hashes each frozen tensor as it gathers it);
    `state` then holds only the trainable tensors. LoRA adapters (`...lora_A.default.weight`) are kept under their
    own names beside the trained tensors; their layers' frozen weights are fingerprinted under transformers' names,
    and `extra_meta["lora"]["scale"]` (alpha / r) says how merge_trainable folds them in.
    """
    from expblip.model.lora import base_name, is_adapter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(config)
    state = strip_prefix(dict(state))
    adapters = {k: v for k, v in state.items() if is_adapter(k)}
    if adapters and "scale" not in (extra_meta or {}).get("lora", {}):
        raise ValueError(f"export to {out}: LoRA adapters need extra_meta['lora']['scale'] (alpha / r)")
    state = {base_name(k): v for k, v in state.items() if not is_adapter(k) and base_name(k) not in aliases}
    if frozen is not None:
        state = {**state, **{k: torch.empty(v["shape"], device="meta") for k, v in frozen.items()}}  # shapes
    check_state(state, config, f"export to {out}")
    keep = {base_name(k) for k in trainable if not is_adapter(k)}
    absent = sorted(keep - set(state))
    if absent:
        raise ValueError(f"trainable keys not in the checkpoint: {absent[:5]}")
    write_safetensors({**{k: state[k] for k in state if k in keep}, **adapters}, out,
                      name=TRAINABLE_FILE.removesuffix(".safetensors"))
    keep_written = keep | set(adapters)
    if frozen is None:
        frozen = {}
        for key in sorted(set(state) - keep):  # a lazy tower tensor is hashed as it streams, never held whole
            tensor = state[key] if isinstance(state[key], LazyTensor) else state[key].contiguous()
            frozen[key] = {"sha256": fingerprint(tensor), "dtype": str(tensor.dtype).removeprefix("torch."),
                           "shape": list(tensor.shape)}
    frozen = dict(sorted(frozen.items()))
    config.save_pretrained(out)
    meta = {"format": "trainable-only", "trainable": sorted(keep_written), "frozen": frozen,
            "towers": _tower_digests(frozen), **(extra_meta or {})}
    _write_side_files(out, config, tokenizer, resolved_config_yaml, meta)
    return out


def _tower_digests(frozen: dict[str, dict]) -> dict[str, str]:
    """One digest per frozen tower (over its tensors' fingerprints, in key order): easy to compare by eye."""
    towers: dict[str, Any] = {}
    for key in sorted(frozen):
        towers.setdefault(key.split(".")[0], hashlib.sha256()).update(frozen[key]["sha256"].encode())
    return {t: h.hexdigest() for t, h in towers.items()}


def read_trainable_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trained tensors, expblip.json) of a trainable-only export."""
    path = Path(path)
    meta_file = path / "expblip.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("format") != "trainable-only":
        raise ValueError(f"{path} is not a trainable-only export (expblip.json has no format: trainable-only)")
    files = sorted(path.glob("trainable*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_safetensors(f))
    return state, meta


def check_towers(towers: Mapping[str, torch.Tensor], frozen: Mapping[str, dict]) -> list[str]:
    """Problems ('key: why') between the given towers and the recorded fingerprints; [] when they match."""
    problems = []
    for key, want in frozen.items():
        tensor = towers.get(key)
        if tensor is None:
            problems.append(f"{key}: absent from the towers")
        elif list(tensor.shape) != want["shape"]:
            problems.append(f"{key}: shape {list(tensor.shape)}, expected {want['shape']}")
        elif fingerprint(tensor, getattr(torch, want["dtype"])) != want["sha256"]:
            problems.append(f"{key}: different values (towers in {str(tensor.dtype).removeprefix('torch.')}, "
                            f"trained with {want['dtype']})")
    return problems


def merge_trainable(path: str | Path, towers: str | Path | WeightSource | Mapping[str, Any]) -> dict[str, Any]:
    """Full state: `towers` (anything open_weights reads, a WeightSource or a state dict) overlaid with a
    trainable-only export, its LoRA adapters folded into their layers (W + alpha/r * B @ A). Towers from a path stay lazy (LazyTensor): they are hashed and, later, written one tensor
    at a time, so merging a 7B model needs one tensor's memory.

    Raises TowerMismatchError naming the first differing tensors unless every frozen tensor matches its fingerprint.
    """
    trained, meta = read_trainable_export(path)
    if not isinstance(towers, Mapping):
        source = towers if isinstance(towers, WeightSource) else open_weights(towers)
        towers = {k: source.lazy(k) for k in source.entries}
    towers = strip_prefix(dict(towers))
    problems = check_towers(towers, meta["frozen"])
    if problems:
        by_tower = _towers(p.split(":")[0] for p in problems)
        raise TowerMismatchError(f"{path} was trained on other frozen towers: {len(problems)} of "
                                 f"{len(meta['frozen'])} tensors differ ({by_tower}), e.g.\n  "
                                 + "\n  ".join(problems[:5]))
    state = {**{k: towers[k] for k in meta["frozen"]}, **trained}
    if "lora" in meta:  # the adapters folded into their layers: a plain Blip2 state
        from expblip.model.lora import merge_adapters

        state = merge_adapters(state, float(meta["lora"]["scale"]))
    return state


def load_trainable_export(path: str | Path, towers: str | Path | Mapping[str, torch.Tensor],
                          dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, meta) from a trainable-only export merged onto its frozen towers."""
    path = Path(path)
    state = merge_trainable(path, towers)
    config = Blip2Config.from_pretrained(str(path), local_files_only=True)
    model = Blip2ForConditionalGeneration(config)
    load_into_model(model, state, strict=True)
    if dtype != torch.float32:  # as from_pretrained(dtype=...): the Q-Former and query tokens stay fp32
        model.to(dtype)
        model.qformer.float()
        model.query_tokens.data = model.query_tokens.data.float()
    return model.eval(), load_tokenizer(path), read_trainable_export(path)[1]
