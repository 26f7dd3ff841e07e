"""Records → WebDataset tar shards + ``manifest.json`` on any fsspec URL (local path, ``file://``, ``s3://``).

A record is ``{"key": str, "image": PIL.Image | bytes, "labels": dict, "captions": list[str]}``. Each becomes one
sample in a tar shard with the members ``KEY.png`` (or ``KEY.jpg`` when given JPEG bytes), ``KEY.json`` (the labels
plus ``"captions"``) and ``KEY.txt`` (the first caption), so any WebDataset reader can open the shards.

    manifest = write_shards(synthetic_records(...), "s3://bucket/synthetic/train", meta={"seed": 0})
    urls, counts = resolve_shards("s3://bucket/synthetic/train")          # or .../manifest.json, or a brace pattern

Writing is resumable: after every finished shard its size and sha256 go into ``manifest.partial.json``; a re-run
with the same records skips those shards (checking sizes and keys) and continues. ``manifest.json`` is written last.

Object storage: with ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``
set, ``s3://`` URLs need nothing in code. ``register_fsspec_openers()`` teaches ``webdataset.gopen`` the same schemes.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FORMAT = "expblip-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
SHARD_NAME = "shard-{:06d}.tar"
MAKE_SHARDS_HINT = "run `python launch/make_shards.py synthetic --out DIR` to create shards"
# Schemes webdataset cannot open by itself but fsspec can (it already shells out to gsutil for gs://).
FSSPEC_SCHEMES = ("s3", "s3a", "gcs", "az", "abfs", "abfss", "memory")
_TAR_BLOCK = 512


# ---------------------------------------------------------------- URLs and file systems


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint from the standard AWS variables (credentials stay in the env).

    Passing the endpoint explicitly (s3fs also reads it) keys fsspec's instance cache by endpoint, so two servers in
    one process (tests) never share a client. Nothing here is logged.
    """
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    endpoint = s3_endpoint()
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def s3_endpoint() -> str:
    """The S3 endpoint the standard AWS variables name ('' = AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and in-system path for ``url``."""
    return fsspec.core.url_to_fs(url, **storage_options(url))


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than ``file://``."""
    return "://" in url and not url.startswith("file://")


def absolute_url(url: str) -> str:
    """Local paths and ``file://`` URLs → absolute local paths; remote URLs unchanged."""
    if is_remote(url):
        return url
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def join_url(base: str, name: str) -> str:
    """``base/name`` for local paths and URLs alike (``name`` may already be absolute)."""
    if "://" in name or os.path.isabs(name):
        return name
    return posixpath.join(base.rstrip("/"), name) if is_remote(base) else os.path.join(base, name)


def parent_url(url: str) -> str:
    """The directory (prefix) containing ``url``."""
    return url.rstrip("/").rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(url)


def fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """A ``webdataset.gopen`` handler that opens any fsspec URL (``s3://`` with the AWS env settings)."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


def register_fsspec_openers(schemes: Iterable[str] = FSSPEC_SCHEMES) -> None:
    """Let plain ``wds.WebDataset(urls)`` read ``s3://`` (and other fsspec) shards; idempotent."""
    # `wds.gopen` is the function; the dispatch table lives in the module of the same name.
    table = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in schemes:
        table[scheme] = fsspec_gopen


def _read_json(url: str) -> dict:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _write_json(url: str, obj: dict) -> None:
    """Writes ``obj``; atomically on local disks (a crash mid-write must not corrupt the resume state)."""
    fs, path = url_to_fs(url)
    data = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an object PUT is atomic


# ---------------------------------------------------------------- encoding


def _image_bytes(image: Image.Image | bytes, key: str) -> tuple[str, bytes]:
    """(extension, bytes): encoded bytes pass through (sniffed), PIL images become PNG (lossless)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "png", buf.getvalue()
    if isinstance(image, bytes | bytearray):
        if image[:8] == b"\x89PNG\r\n\x1a\n":
            return "png", bytes(image)
        if image[:3] == b"\xff\xd8\xff":
            return "jpg", bytes(image)
    raise ValueError(f"record {key!r}: 'image' must be a PIL image or PNG/JPEG bytes, got {type(image).__name__}")


JPEG_QUALITY = 95  # of images re-encoded by write_shards(resize=...): JPEG sources stay JPEG at this quality


def resized(image: Image.Image | bytes, side: int, key: str) -> Image.Image | bytes:
    """``image`` with its short side brought down to ``side`` pixels (bicubic; never enlarged): JPEG sources come
    back as JPEG bytes at JPEG_QUALITY (decoded with PIL's draft first), others as a PIL image (written as PNG)."""
    jpeg = isinstance(image, bytes | bytearray) and image[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(image)) if isinstance(image, bytes | bytearray) else image
    if min(img.size) <= side:
        return image
    scale = side / min(img.size)
    size = (max(side, round(img.width * scale)), max(side, round(img.height * scale)))
    if jpeg:
        img.draft("RGB", size)  # libjpeg's DCT scaling down to no less than the target, then bicubic
    try:
        small = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    except Exception as err:
        raise ValueError(f"record {key!r}: its image cannot be decoded for --resize ({err})") from err
    if not jpeg:
        return small
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_record(record: dict, resize: int = 0) -> dict[str, Any]:
    """A record → a WebDataset sample ``{"__key__", "png"|"jpg", "json", "txt"}`` of bytes; ``resize`` > 0 writes
    the image with its short side at most that many pixels (see ``resized``)."""
    key = record.get("key")
    # webdataset splits member names at the first dot of the basename: a dotted key would corrupt its sample.
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"record key {key!r} must be a non-empty string without '.'")
    captions = [str(c) for c in record.get("captions") or []]
    image = record.get("image")
    if resize and isinstance(image, Image.Image | bytes | bytearray):
        image = resized(image, resize, key)
    ext, image = _image_bytes(image, key)
    labels = dict(record.get("labels") or {}, captions=captions)
    sample = {"__key__": key, ext: image, "json": json.dumps(labels, sort_keys=True, ensure_ascii=False).encode()}
    if captions:
        sample["txt"] = captions[0].encode("utf-8")
    return sample


def _tar_size(sample: dict[str, Any]) -> int:
    """Bytes the sample adds to a tar: a 512-byte header per member plus its data padded to 512."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("__")]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


class HashingWriter:
    """Forwards writes while counting bytes and computing the sha256 recorded in the manifest."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.nbytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------- writing


def _new_manifest(samples_per_shard: int, max_shard_bytes: int, meta: dict | None) -> dict:
    # json round trip: a tuple in meta must compare equal to the list read back on resume
    meta = json.loads(json.dumps(meta or {}))
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "meta": meta,
        "shards": [],
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
    }


def _finish_manifest(manifest: dict) -> dict:
    manifest["total_samples"] = sum(s["samples"] for s in manifest["shards"])
    manifest["total_bytes"] = sum(s["bytes"] for s in manifest["shards"])
    return manifest


def _previous_manifest(out: str) -> dict | None:
    """The finished or partial manifest of an earlier run into ``out``, if any."""
    for name in (PARTIAL_MANIFEST, MANIFEST):
        try:
            return _read_json(join_url(out, name))
        except FileNotFoundError:
            continue
        except ValueError as exn:  # a torn local write predates atomic writes; start over rather than trust it
            log.warning("ignoring unreadable %s in %s (%s); rewriting all shards", name, out, exn)
            return None
    return None


def _resume_state(out: str, fresh: dict) -> dict:
    """``fresh`` extended by the shards an earlier run finished (verified by size); settings must match."""
    old = _previous_manifest(out)
    if old is None:
        return fresh
    for field in ("format", "version", "samples_per_shard", "max_shard_bytes", "meta"):
        if old.get(field) != fresh[field]:
            raise ValueError(
                f"{out} holds shards written with {field}={old.get(field)!r}, not {fresh[field]!r}; "
                "write to a new directory or delete the old shards"
            )
    fs, _ = url_to_fs(out)
    for entry in old["shards"]:
        _, path = url_to_fs(join_url(out, entry["url"]))
        if not fs.exists(path) or fs.size(path) != entry["bytes"]:
            log.warning("shard %s is missing or changed since it was recorded; rewriting from there", entry["url"])
            break
        fresh["shards"].append(entry)
    return fresh


def _skip_written(records: Iterator[dict], shards: list[dict], out: str, bar: tqdm) -> None:
    """Consumes (without encoding) the records already in ``shards``, checking their keys match."""
    for entry in shards:
        keys = []
        for _ in range(entry["samples"]):
            record = next(records, None)
            if record is None:
                raise ValueError(f"{out} already holds more samples than these records; write to a new directory")
            keys.append(record.get("key", record.get("__key__")))  # a record, or a sample from an encoder
        if [keys[0], keys[-1]] != [entry["first_key"], entry["last_key"]]:
            raise ValueError(
                f"records differ from those already written to {out} ({entry['url']} starts with "
                f"{entry['first_key']!r}, these records with {keys[0]!r}); write to a new directory"
            )
        bar.update(entry["samples"])


def _write_one_shard(
    url: str, first: dict, samples: Iterator[dict], limits: tuple[int, int], bar: tqdm
) -> tuple[dict, dict | None]:
    """Writes ``first`` and following samples until a limit; returns (manifest entry, the sample that did not fit)."""
    import webdataset as wds  # heavy import, needed only when writing

    max_samples, max_bytes = limits
    fs, path = url_to_fs(url)
    count, nbytes, keys, pending = 0, 0, [], first
    with fs.open(path, "wb") as f:
        sink = HashingWriter(f)
        with wds.TarWriter(sink, encoder=False, mtime=0) as writer:  # fixed int mtime: same bytes, no pax headers
            while pending is not None:
                size = _tar_size(pending)
                if count and (count >= max_samples or nbytes + size > max_bytes):
                    break
                writer.write(pending)
                count, nbytes = count + 1, nbytes + size
                keys.append(pending["__key__"])
                bar.update(1)
                pending = next(samples, None)
    entry = {
        "url": posixpath.basename(path),
        "samples": count,
        "bytes": sink.nbytes,
        "sha256": sink.sha.hexdigest(),
        "first_key": keys[0],
        "last_key": keys[-1],
    }
    return entry, pending


def write_shards(
    records: Iterable[dict],
    out: str,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 << 20,
    meta: dict | None = None,
    progress: bool = True,
    resize: int = 0,
    encoder: Callable[[Iterator[dict]], Iterator[dict]] | None = None,
) -> dict:
    """Writes ``records`` as ``out/shard-000000.tar``… plus ``out/manifest.json``; returns the manifest.

    A shard closes at ``samples_per_shard`` samples or before exceeding ``max_shard_bytes``. Re-running into the same
    ``out`` with the same records and settings skips the shards listed in the partial manifest and continues.
    ``resize`` > 0: images are written with their short side at most that many pixels (JPEG at JPEG_QUALITY), so
    training decodes less; the manifest's meta records it. ``encoder`` turns the records into samples in their order
    (default: ``encode_record`` here, one at a time; expblip.data.sources.parallel's encodes on several processes, and
    a resumed run through it encodes the records already written too, to count their skips).
    """
    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError("samples_per_shard and max_shard_bytes must be positive")
    fs, root = url_to_fs(out)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)  # object stores have no directories (and makedirs could create a bucket)
    if resize:
        meta = {**(meta or {}), "resize": resize, "jpeg_quality": JPEG_QUALITY}
    manifest = _resume_state(out, _new_manifest(samples_per_shard, max_shard_bytes, meta))
    records = iter(records)
    with tqdm(desc=f"shards → {out}", unit="sample", disable=not progress, mininterval=2.0) as bar:
        if encoder is None:
            _skip_written(records, manifest["shards"], out, bar)
            samples = (encode_record(r, resize) for r in records)
        else:
            samples = encoder(records)
            _skip_written(samples, manifest["shards"], out, bar)
        pending = next(samples, None)
        while pending is not None:
            shard_url = join_url(out, SHARD_NAME.format(len(manifest["shards"])))
            entry, pending = _write_one_shard(shard_url, pending, samples, (samples_per_shard, max_shard_bytes), bar)
            manifest["shards"].append(entry)
            _write_json(join_url(out, PARTIAL_MANIFEST), _finish_manifest(manifest))  # the shard now counts
    manifest["complete"] = True
    _write_json(join_url(out, MANIFEST), _finish_manifest(manifest))
    _, partial = url_to_fs(join_url(out, PARTIAL_MANIFEST))
    if fs.exists(partial):
        fs.rm(partial)
    return manifest


# ---------------------------------------------------------------- reading


def _manifest_url(url: str) -> str:
    url = absolute_url(url)
    return url if url.endswith(".json") else join_url(url, MANIFEST)


def read_manifest(url: str) -> dict:
    """The manifest at ``url`` (``…/manifest.json`` or the directory holding it)."""
    murl = _manifest_url(url)
    try:
        manifest = _read_json(murl)
    except FileNotFoundError:
        fs, partial = url_to_fs(join_url(parent_url(murl), PARTIAL_MANIFEST))
        if fs.exists(partial):
            raise FileNotFoundError(
                f"no {MANIFEST} at {murl}: writing the shards was interrupted; re-run the same make_shards command "
                "to resume it"
            ) from None
        raise FileNotFoundError(
            f"no shard manifest at {murl}; {MAKE_SHARDS_HINT}, or pass a brace pattern "
            "such as DIR/shard-{000000..000009}.tar"
        ) from None
    except (ValueError, UnicodeDecodeError) as exn:
        raise ValueError(f"{murl} is not valid JSON ({exn}); {MAKE_SHARDS_HINT}") from None
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{murl} is not an {FORMAT} manifest of version <= {FORMAT_VERSION}")
    return manifest


def _expand_braces(pattern: str) -> list[str]:
    from braceexpand import braceexpand  # a webdataset dependency

    return [absolute_url(u) for u in braceexpand(pattern)]


def _sibling_counts(urls: list[str]) -> list[int] | None:
    """Sample counts for shards that all sit beside one manifest; None when unknown."""
    folders = {parent_url(u) for u in urls}
    if len(folders) != 1:
        return None
    try:
        manifest = read_manifest(folders.pop())
    except (FileNotFoundError, ValueError):
        return None
    by_name = {posixpath.basename(s["url"]): s["samples"] for s in manifest["shards"]}
    counts = [by_name.get(posixpath.basename(u)) for u in urls]
    return None if None in counts else counts


def resolve_shards(spec: str | list[str]) -> tuple[list[str], list[int] | None]:
    """Absolute shard URLs and per-shard sample counts (None when unknown) for a shard spec.

    ``spec`` is a manifest URL (``…/manifest.json`` or its directory), a brace pattern
    (``dir/shard-{000000..000003}.tar``), a single ``.tar`` URL, or a list of shard URLs.
    """
    register_fsspec_openers()
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError(f"the shard list is empty; {MAKE_SHARDS_HINT} and pass its directory")
        return [absolute_url(u) for u in spec], None
    spec = spec.strip()
    if not spec:
        raise ValueError(f"no shards given (set data.train.shards / data.eval.shards); {MAKE_SHARDS_HINT}")
    if "{" in spec or spec.endswith((".tar", ".tar.gz", ".tgz")):
        urls = _expand_braces(spec)
        return urls, _sibling_counts(urls)
    manifest = read_manifest(spec)
    if not manifest["shards"]:
        raise ValueError(f"{_manifest_url(spec)} lists no shards (no records were written); {MAKE_SHARDS_HINT}")
    base = parent_url(_manifest_url(spec))
    return [join_url(base, s["url"]) for s in manifest["shards"]], [s["samples"] for s in manifest["shards"]]
