"""Pipeline step 4: fuse each image's AU caption and emotion caption into one facial-expression caption.

    stats = fuse_shards("shards/pseudo", "shards/fused", method="llm",
                        llm=LLMConfig(url="http://127.0.0.1:8000/v1", model="meta-llama/Llama-3.1-8B-Instruct"))
    stats = fuse_shards("shards/pseudo", "shards/cat", method="concat")        # Cat-BLIP; no LLM, CPU only

Input fields (the sample's json, i.e. its labels):
    au_caption       str | list[str]   the AU sentence(s): rule or LLM caption, or AU-BLIP's pseudo-caption (step 3)
    emotion_caption  str | list[str]   the emotion sentence(s), or Emot-BLIP's pseudo-caption (step 3)
A missing field is derived from the labels: ``au_caption(labels["aus"])`` (the paper's fixed no-AU caption for an
empty list) and ``emotion_caption(labels["emotions"])``. A sample still lacking one of the two is skipped and
counted (``missing_caption``): there is nothing to fuse.

Output: the same keys and image bytes; ``captions`` holds one fused caption per (AU sentence, emotion sentence)
pair; the json keeps the input labels, the ``au_caption`` / ``emotion_caption`` actually used, and
``"fusion": {"method", "model", "prompt_sha"}`` (model and prompt_sha are None for concat).

Resuming: shards are written by ``write_shards``, which records each finished shard; re-running the same command
skips those (their samples' LLM replies come from the cache, so no request is repeated) and continues. A finished
job returns at once. An LLM failure after the client's retries stops the job once more than ``max_failures``
samples failed, leaving the finished shards for the next run; failures within the tolerance are dropped, listed in
``fusion_failures.json`` beside the shards and dropped again by any re-run into the same directory (so resumed
shards line up); write to a new directory to retry them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import product
from typing import Literal

from PIL import Image

from expblip.data.captions import NO_AU_CAPTION, au_caption, concat_fusion, emotion_caption
from expblip.data.llm import FUSION_PROMPT_SHA, LLMClient, LLMConfig, LLMError, llm_fuse
from expblip.data.shards import (
    MANIFEST,
    PARTIAL_MANIFEST,
    absolute_url,
    join_url,
    read_manifest,
    resolve_shards,
    url_to_fs,
    write_shards,
)
from expblip.data.stream import ErrorCounter, read_shard

log = logging.getLogger(__name__)

FAILURES_FILE = "fusion_failures.json"
_PASS_THROUGH = ("png", "jpg", "jpeg")  # image members copied byte for byte; webp is re-encoded as PNG
_STALE_LABELS = ("captions", "caption_sources", "caption_errors")  # described the input captions, not ours
MAX_ERRORS_KEPT = 20


@dataclass
class FusionStats:
    """What one fuse_shards run did (returned as a dict)."""

    complete: bool = False  # manifest.json written: every input sample fused, dropped or skipped
    already_done: bool = False  # the output was complete before this run; nothing was read
    samples_in: int = 0  # input samples read (those of resumed shards included)
    fused: int = 0  # samples given fused captions (those of resumed shards included)
    failed: int = 0  # samples whose LLM fusion failed after retries in this run
    dropped_earlier: int = 0  # samples dropped because an earlier run listed them in fusion_failures.json
    missing_caption: int = 0  # samples lacking an AU or an emotion sentence (skipped)
    bad_input: int = 0  # unreadable shards, bad json or missing images (skipped)
    cached: int = 0  # LLM replies served from the cache
    requests: int = 0  # HTTP requests sent to the LLM (retries included)
    shards_resumed: int = 0  # output shards an earlier run had finished
    shards: int = 0  # output shards in the manifest at the end
    written: int = 0  # samples in the output manifest at the end
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT problems, "key: message"

    def note(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)


class _Stop(Exception):
    """Too many LLM failures: abandon the shard being written (write_shards keeps the finished ones)."""


@dataclass
class _Result:
    key: str
    record: dict | None = None
    problem: Literal["", "missing_caption", "bad_input", "failed"] = ""
    detail: str = ""


# ---------------------------------------------------------------- one sample


def _as_list(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [s.strip() for s in items if isinstance(s, str) and s.strip()]


def sentences(labels: dict) -> tuple[list[str], list[str]]:
    """(AU sentences, emotion sentences) of a sample: its caption fields, else derived from aus / emotions."""
    aus = _as_list(labels.get("au_caption"))
    if not aus and isinstance(labels.get("aus"), list):
        aus = [au_caption(labels["aus"]) or NO_AU_CAPTION]
    emotions = _as_list(labels.get("emotion_caption"))
    if not emotions and labels.get("emotions"):
        emotions = _as_list(emotion_caption(labels["emotions"]))
    return aus, emotions


def _image(raw: dict) -> bytes | Image.Image | None:
    for ext in _PASS_THROUGH:
        if ext in raw:
            return raw[ext]
    return Image.open(io.BytesIO(raw["webp"])) if "webp" in raw else None


def _fuse_sample(raw: dict, fuse: Callable[[str, str], str], provenance: dict) -> _Result:
    """Fused record of one input sample, or why there is none; LLM failures are returned, not raised."""
    key = raw["__key__"]
    try:
        labels = json.loads(raw.get("json", b"{}").decode("utf-8"))
        image = _image(raw)
        aus, emotions = sentences(labels) if isinstance(labels, dict) else ([], [])
    except Exception as exn:  # bad json, bad AU numbers, an undecodable webp: data problems, counted
        return _Result(key, problem="bad_input", detail=repr(exn))
    if image is None or not isinstance(labels, dict):
        return _Result(key, problem="bad_input", detail="no image member or json is not an object")
    if not aus or not emotions:
        return _Result(key, problem="missing_caption", detail=f"au_caption={aus!r}, emotion_caption={emotions!r}")
    try:
        captions = list(dict.fromkeys(fuse(a, e) for a, e in product(aus, emotions)))
    except LLMError as exn:
        return _Result(key, problem="failed", detail=str(exn))
    kept = {k: v for k, v in labels.items() if k not in _STALE_LABELS}
    kept["au_caption"] = aus if len(aus) > 1 else aus[0]
    kept["emotion_caption"] = emotions if len(emotions) > 1 else emotions[0]
    kept["fusion"] = provenance
    return _Result(key, record={"key": key, "image": image, "labels": kept, "captions": captions})


# ---------------------------------------------------------------- the stream of fused records


def _ordered_map(fn: Callable[[dict], _Result], items: Iterable[dict], workers: int) -> Iterator[_Result]:
    """``map(fn, items)`` on ``workers`` threads, in input order, with a bounded number in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fusion")
    try:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _input_samples(urls: list[str], stats: FusionStats) -> Iterator[dict]:
    errors = ErrorCounter.unlimited()  # the stats report them
    for url in urls:
        before = errors.skipped
        yield from read_shard(url, errors)
        if errors.skipped > before:
            stats.bad_input += errors.skipped - before
            stats.note(f"{url}: unreadable or truncated shard {dict(errors.counts)}")


def _account(result: _Result, stats: FusionStats, dropped: dict[str, str], max_failures: int, out: str) -> None:
    """Counts ``result``; a failure beyond the tolerance raises _Stop, one within it is recorded as dropped."""
    if result.problem in ("missing_caption", "bad_input"):
        setattr(stats, result.problem, getattr(stats, result.problem) + 1)
        stats.note(f"{result.key}: {result.problem}: {result.detail}")
        return
    if result.problem == "failed":
        stats.failed += 1
        stats.note(f"{result.key}: {result.detail}")
        if stats.failed > max_failures:
            raise _Stop(f"{result.key}: {result.detail}")
        dropped[result.key] = result.detail
        _save_failures(out, dropped)
        return
    stats.fused += 1


def _fused_records(
    urls: list[str],
    fuse_fn: Callable[[dict], _Result],
    workers: int,
    stats: FusionStats,
    dropped: dict[str, str],
    max_failures: int,
    out: str,
) -> Iterator[dict]:
    earlier = set(dropped)

    def samples() -> Iterator[dict]:
        for raw in _input_samples(urls, stats):
            stats.samples_in += 1
            if raw["__key__"] in earlier:
                stats.dropped_earlier += 1
                continue
            yield raw

    with contextlib.closing(_ordered_map(fuse_fn, samples(), workers)) as results:
        for result in results:
            _account(result, stats, dropped, max_failures, out)
            if result.record is not None:
                yield result.record


# ---------------------------------------------------------------- the job


def _load_failures(out: str) -> dict[str, str]:
    fs, path = url_to_fs(join_url(out, FAILURES_FILE))
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))["dropped"]


def _save_failures(out: str, dropped: dict[str, str]) -> None:
    fs, path = url_to_fs(join_url(out, FAILURES_FILE))
    fs.pipe_file(path, json.dumps({"dropped": dropped}, indent=1, sort_keys=True).encode("utf-8"))


def _previous(out: str, name: str) -> dict | None:
    try:
        return read_manifest(join_url(out, name))
    except (FileNotFoundError, ValueError):
        return None


def _fuser(method: str, client: LLMClient | None) -> Callable[[str, str], str]:
    if method == "concat":
        return concat_fusion
    assert client is not None
    return lambda au, emotion: llm_fuse(client, au, emotion)


def _setup(method: str, llm: LLMConfig | None, client: LLMClient | None) -> tuple[LLMClient | None, dict]:
    """The client (llm only) and the provenance stamp every output sample carries."""
    if method not in ("concat", "llm"):
        raise ValueError(f"fusion method must be 'concat' or 'llm', got {method!r}")
    if method == "concat":
        return None, {"method": "concat", "model": None, "prompt_sha": None}
    if client is None:
        if llm is None:
            raise ValueError("method='llm' needs llm=LLMConfig(url=..., model=...) (set fusion.llm.url and .model)")
        client = LLMClient(llm)
    return client, {"method": "llm", "model": client.cfg.model, "prompt_sha": FUSION_PROMPT_SHA}


def fuse_shards(
    in_shards: str,
    out: str,
    method: Literal["concat", "llm"],
    llm: LLMConfig | None = None,
    *,
    samples_per_shard: int = 1000,
    max_failures: int = 0,
    workers: int = 4,
    progress: bool = False,
    client: LLMClient | None = None,
) -> dict:
    """Fuse the AU and emotion captions of every sample of ``in_shards`` into shards at ``out``; returns the stats.

    ``workers`` LLM calls run at once (order is kept); ``client`` overrides the one built from ``llm``.
    Check ``stats["complete"]``: a run stopped by LLM failures returns complete=False and can simply be re-run.
    """
    client, provenance = _setup(method, llm, client)
    stats = FusionStats()
    source = absolute_url(in_shards) if isinstance(in_shards, str) else in_shards
    llm_meta = {"temperature": client.cfg.temperature, "max_tokens": client.cfg.max_tokens} if client else None
    meta = json.loads(json.dumps({"source": source, "fusion": provenance, "llm": llm_meta}))
    done = _previous(out, MANIFEST)
    if done and done.get("complete") and done.get("meta") == meta:
        stats.complete = stats.already_done = True
        stats.shards, stats.written = len(done["shards"]), done["total_samples"]
        return asdict(stats)
    stats.shards_resumed = len((_previous(out, PARTIAL_MANIFEST) or {}).get("shards", []))
    urls, _ = resolve_shards(in_shards)
    counters = (client.cache_hits, client.requests) if client else (0, 0)
    fuse = _fuser(method, client)
    records = _fused_records(
        urls,
        lambda raw: _fuse_sample(raw, fuse, provenance),
        workers if client else 1,
        stats,
        _load_failures(out),
        max_failures,
        out,
    )
    try:
        manifest = write_shards(records, out, samples_per_shard=samples_per_shard, meta=meta, progress=progress)
        stats.complete, stats.shards, stats.written = True, len(manifest["shards"]), manifest["total_samples"]
    except _Stop as stop:
        log.error(
            "fusion into %s stopped: %d LLM failures > max_failures=%d (last: %s); finished shards are kept, "
            "re-run to continue",
            out,
            stats.failed,
            max_failures,
            stop,
        )
        finished = (_previous(out, PARTIAL_MANIFEST) or {}).get("shards", [])
        stats.shards, stats.written = len(finished), sum(s["samples"] for s in finished)
    if client:
        stats.cached, stats.requests = client.cache_hits - counters[0], client.requests - counters[1]
    return asdict(stats)
