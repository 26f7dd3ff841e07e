"""Weights in and out: HF-format export directories that stock transformers loads, and their import.

An export directory holds model.safetensors + config.json (Blip2ForConditionalGeneration.save_pretrained),
the tokenizer, `expblip.json` (image size, normalisation, generation end token) and the run's resolved
config as `config.yaml`. Only safe formats are read (safetensors; no pickles).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from expblip.data.stream import CLIP_MEAN, CLIP_STD  # noqa: F401 - re-exported for serve
from expblip.model.tokenizer import caption_end_id, load_tokenizer

PREFIX = "blip2."  # CaptionModel wraps the HF model under this attribute


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
    tokenizer.save_pretrained(out)
    meta = {"image_size": config.vision_config.image_size, "mean": CLIP_MEAN, "std": CLIP_STD,
            "caption_end_id": caption_end_id(tokenizer), "num_query_tokens": config.num_query_tokens}
    (out / "expblip.json").write_text(json.dumps(meta, indent=2))
    if resolved_config_yaml:
        (out / "config.yaml").write_text(resolved_config_yaml)
    return out


def _is_tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and model.config.text_config.tie_word_embeddings


def load_export(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, meta) from an export directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an expblip export (no config.json); pass RUN_DIR/export "
                                "or the --out of launch/export.py")
    model = Blip2ForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                          use_safetensors=True)
    meta = json.loads((path / "expblip.json").read_text()) if (path / "expblip.json").is_file() else {}
    return model.eval(), load_tokenizer(path), meta


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
