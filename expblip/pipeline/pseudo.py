"""Pipeline step 3: pseudo-captions. A model describes the aspect an image's dataset does not label.

    stats = pseudo_caption("shards/emotion", "shards/pseudo_emotion", "runs/au_blip", "au_caption", PseudoConfig())
    stats = pseudo_caption("shards/au", "shards/pseudo_au", "runs/emot_blip", "emotion_caption", PseudoConfig())

AU-BLIP writes ``labels["au_caption"]`` for the emotion dataset's images, Emot-BLIP ``labels["emotion_caption"]`` for
the AU dataset's; step 4 (``expblip.pipeline.fusion``) then fuses each image's two sentences.

Distributed batch inference on Ray: ``num_workers`` actors each load the export once (on a GPU with ``use_gpu``),
and every input shard is one task (``caption_shard``) that reads the shard, captions its images ``batch_size`` at a
time and writes one output shard of the same name: same keys, image bytes copied, labels unchanged but for the added
caption and its provenance ``labels["pseudo"] = {"model": export dir, "export_sha": sha256 of model.safetensors,
"generation": the decoding settings}``. Ray is started with ``ray.init(address="local")``, or attached with "auto"
when ``RAY_ADDRESS`` is set (``ray job submit``).

Resuming is per shard: an output shard that exists with the input's sample count (by its recorded entry, or by
counting its keys) is skipped, so re-running after an interruption or after deleting an output shard captions only
what is missing. ``manifest.json`` is written once every shard is done. An output directory holds the captions of
one export and one decoding setting: re-running with another export (its sha differs) is refused; write elsewhere.
A sample without a readable image or labels is dropped and counted in the shard's entry (``skipped``); an empty
generated caption is kept as "" and counted (``empty``), and fusion then skips that sample as missing a sentence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from expblip.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    HashingWriter,
    encode_record,
    join_url,
    resolve_shards,
    url_to_fs,
)
from expblip.data.stream import ErrorCounter, count_each, read_shard
from expblip.model.generation import GenerationConfig

log = logging.getLogger(__name__)

CaptionField = Literal["au_caption", "emotion_caption"]
JOB_FILE = "pseudo_job.json"  # the job's settings, written first: a later run into the same directory must match
PROGRESS_FILE = "pseudo.partial.json"  # entries of the finished shards, rewritten after each one
SHARD_NAME = "shard-{:06d}.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass
class PseudoConfig:
    """Ray batch inference: how many model copies, where they run, and how they decode."""

    num_workers: int = 2  # Ray actors, each holding one copy of the model; one input shard per task
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # one GPU (gpus_per_worker of one) per actor, and the model on cuda
    gpus_per_worker: float = 1.0
    batch_size: int = 64  # images per generate() call
    dtype: Literal["bf16", "fp16", "fp32"] = "fp32"  # the model's weights and compute (bf16 halves its memory)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(num_beams=3))

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.batch_size < 1:
            raise ValueError("pseudo.num_workers and pseudo.batch_size must be >= 1, pseudo.cpus_per_worker > 0")


# ---------------------------------------------------------------- Ray


# ---------------------------------------------------------------- one shard (runs in a Ray actor)


def write_tar(url: str, samples: list[dict]) -> dict:
    """Write encoded samples to ``url`` (via a temporary name, so a shard is whole or absent); its manifest entry."""
    import webdataset as wds

    fs, path = url_to_fs(url)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        sink = HashingWriter(f)
        with wds.TarWriter(sink, encoder=False, mtime=0) as writer:  # fixed int mtime: same bytes, no pax headers
            for sample in samples:
                writer.write(sample)
    fs.mv(tmp, path)
    keys = [s["__key__"] for s in samples]
    return {"url": os.path.basename(path), "samples": len(samples), "bytes": sink.nbytes,
            "sha256": sink.sha.hexdigest(), "first_key": keys[0] if keys else None,
            "last_key": keys[-1] if keys else None}


class ShardCaptioner:
    """One model copy; ``caption_shard`` is one task. Plain class: Ray wraps it as an actor (``ray.remote``)."""

    def __init__(self, export: str, field_name: CaptionField, provenance: dict, cfg: PseudoConfig) -> None:
        import torch

        from expblip.infer.captioner import Captioner

        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.captioner = Captioner.from_export(export, device="cuda" if cfg.use_gpu else "cpu", dtype=cfg.dtype)
        self.field, self.provenance, self.cfg = field_name, provenance, cfg

    def caption_shard(self, in_url: str, out_url: str) -> dict:
        """Caption every image of ``in_url`` into ``out_url``; returns the output's manifest entry (+ timings)."""
        start = time.perf_counter()
        errors = ErrorCounter.unlimited()
        decoded, skipped = [], 0
        for raw in read_shard(in_url, errors):
            item = _decode(raw)
            skipped += item is None
            if item is not None:
                decoded.append(item)
        images = [Image.open(io.BytesIO(image)).convert("RGB") for _, image, _ in decoded]
        captions = self.captioner.caption(images, self.cfg.generation, self.cfg.batch_size) if images else []
        samples = [encode_record({"key": key, "image": image, "captions": labels.pop("captions", None) or [],
                                  "labels": {**labels, self.field: caption, "pseudo": self.provenance}})
                   for (key, image, labels), caption in zip(decoded, captions, strict=True)]
        entry = write_tar(out_url, samples)
        return {**entry, "input_samples": len(decoded) + skipped + errors.skipped, "skipped": skipped + errors.skipped,
                "empty": sum(1 for c in captions if not c.strip()), "seconds": round(time.perf_counter() - start, 2)}


def _decode(raw: dict) -> tuple[str, bytes, dict] | None:
    """(key, image bytes, labels) of a raw sample, or None when it lacks a readable image or a labels object."""
    image = next((raw[ext] for ext in IMAGE_EXTS if ext in raw), None)
    try:
        labels = json.loads(raw.get("json", b"").decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if image is None or not isinstance(labels, dict):
        return None
    return raw["__key__"], image, labels


# ---------------------------------------------------------------- the job (driver)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance_of(export: str | Path, gen: GenerationConfig) -> dict:
    """The ``labels["pseudo"]`` stamp: export directory, sha256 of its weights, decoding settings."""
    from expblip.infer.captioner import resolve_export

    export_dir = resolve_export(export).resolve()
    return {"model": str(export_dir), "export_sha": file_sha256(export_dir / "model.safetensors"),
            "generation": dataclasses.asdict(gen)}


def _read_json(url: str) -> dict | None:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _write_json(url: str, obj: dict) -> None:
    fs, path = url_to_fs(url)
    fs.pipe_file(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def count_keys(url: str) -> int | None:
    """Samples (distinct keys) in a tar shard by reading its headers; None if it is missing or unreadable."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return None
    keys: list[str] = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                key = info.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if info.isreg() and (not keys or keys[-1] != key):
                    keys.append(key)
    except (tarfile.TarError, OSError):
        return None
    return len(keys)


def _finished(out_url: str, expected: int, entry: dict | None) -> bool:
    """True when the output shard exists and holds the input's samples (per its recorded entry, else by counting)."""
    fs, path = url_to_fs(out_url)
    if entry is not None and entry.get("input_samples") == expected and fs.exists(path):
        return fs.size(path) == entry["bytes"]
    return count_keys(out_url) == expected


def _input_counts(urls: list[str], counts: list[int] | None) -> list[int]:
    return counts if counts is not None else count_each(urls)


def _check_job(out: str, job: dict) -> None:
    previous = _read_json(join_url(out, JOB_FILE))
    if previous is not None and previous != job:
        changed = sorted(k for k in job if previous.get(k) != job[k])
        raise ValueError(f"{out} holds pseudo-captions made with other settings ({', '.join(changed)} differ: "
                         f"{ {k: previous.get(k) for k in changed} }); delete it or write to a new directory")
    _write_json(join_url(out, JOB_FILE), job)


def _run_tasks(pending: list[tuple[int, str, str]], export: str, field_name: CaptionField, provenance: dict,
               cfg: PseudoConfig, on_done: Callable[[dict], None]) -> None:
    """One Ray task per pending shard on ``num_workers`` actors; ``on_done(entry)`` as each one finishes."""
    import ray
    from ray.util import ActorPool

    from expblip.train.ray_job import init_ray

    init_ray()  # a no-op when the pipeline started Ray already
    actor_cls = ray.remote(ShardCaptioner).options(num_cpus=cfg.cpus_per_worker,
                                                    num_gpus=cfg.gpus_per_worker if cfg.use_gpu else 0)
    actors = [actor_cls.remote(export, field_name, provenance, cfg) for _ in range(min(cfg.num_workers, len(pending)))]
    try:
        pool = ActorPool(actors)  # at most one task per actor in flight; results as they finish
        for entry in pool.map_unordered(lambda actor, job: actor.caption_shard.remote(job[1], job[2]), pending):
            on_done(entry)
    finally:
        for actor in actors:  # free their CPUs/GPUs for the training stages that follow
            ray.kill(actor)


def pseudo_caption(in_shards: str | list[str], out: str, export: str | Path, field_name: CaptionField,
                   cfg: PseudoConfig | None = None) -> dict:
    """Add ``field_name`` pseudo-captions by ``export`` to every sample of ``in_shards``, written to ``out``.

    Returns {"complete", "shards", "samples", "captioned" (shard names captioned now, one task each), "skipped_shards"
    (already done), "skipped_samples", "empty_captions" (generated but empty: fusion will count them as missing),
    "export_sha"}.
    """
    cfg = cfg or PseudoConfig()
    if field_name not in ("au_caption", "emotion_caption"):
        raise ValueError(f"field_name must be 'au_caption' or 'emotion_caption', got {field_name!r}")
    urls, counts = resolve_shards(in_shards)
    counts = _input_counts(urls, counts)
    provenance = provenance_of(export, cfg.generation)
    fs, root = url_to_fs(out)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)  # object stores have no directories
    _check_job(out, {"source": urls, "field": field_name, "pseudo": provenance})
    recorded = {e["url"]: e for e in ((_read_json(join_url(out, MANIFEST)) or _read_json(join_url(out, PROGRESS_FILE))
                                      or {}).get("shards", []))}
    entries: dict[int, dict] = {}
    pending = []
    for i, (url, count) in enumerate(zip(urls, counts, strict=True)):
        name = SHARD_NAME.format(i)
        if _finished(join_url(out, name), count, recorded.get(name)):
            entries[i] = recorded.get(name) or {"url": name, "samples": count, "input_samples": count, "skipped": 0,
                                                "bytes": fs.size(url_to_fs(join_url(out, name))[1])}
        else:
            pending.append((i, url, join_url(out, name)))
    skipped_shards = sorted(entries)
    if pending:
        log.info("pseudo-captioning %d of %d shards of %s into %s", len(pending), len(urls), in_shards, out)
        _caption_pending(pending, out, provenance, field_name, cfg, entries)
    manifest = _manifest(urls, entries, {"source": urls, "field": field_name, "pseudo": provenance})
    _write_json(join_url(out, MANIFEST), manifest)
    return {"complete": True, "shards": len(urls), "samples": manifest["total_samples"],
            "captioned": [SHARD_NAME.format(i) for i, _, _ in pending],
            "skipped_shards": [SHARD_NAME.format(i) for i in skipped_shards],
            "skipped_samples": sum(e.get("skipped", 0) for e in entries.values()),
            "empty_captions": sum(e.get("empty", 0) for e in entries.values()),
            "export_sha": provenance["export_sha"]}


def _caption_pending(pending: list[tuple[int, str, str]], out: str, provenance: dict, field_name: CaptionField,
                     cfg: PseudoConfig, entries: dict[int, dict]) -> None:
    index_of = {SHARD_NAME.format(i): i for i, _, _ in pending}

    def on_done(entry: dict) -> None:
        entries[index_of[entry["url"]]] = entry
        _write_json(join_url(out, PROGRESS_FILE), {"shards": [entries[i] for i in sorted(entries)]})
        log.info("pseudo: %s/%s: %d %ss in %s s", out, entry["url"], entry["samples"], field_name, entry["seconds"])

    _run_tasks(pending, provenance["model"], field_name, provenance, cfg, on_done)


def _manifest(urls: list[str], entries: dict[int, dict], meta: dict) -> dict:
    shards = [entries[i] for i in range(len(urls))]
    return {"format": FORMAT, "version": FORMAT_VERSION, "complete": True, "meta": meta, "shards": shards,
            "samples_per_shard": max((s["samples"] for s in shards), default=0) or 1, "max_shard_bytes": 256 << 20,
            "total_samples": sum(s["samples"] for s in shards), "total_bytes": sum(s["bytes"] for s in shards)}
