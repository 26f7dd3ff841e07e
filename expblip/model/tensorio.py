"""Safetensors read and written one tensor (or one slice of one tensor) at a time, from local disk or any fsspec URL.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`, then the data;
offsets count from the end of the header. So a reader needs the header and then exactly the bytes of what it wants:

    header = read_header(fs, path)                       # {name: TensorMeta}
    for offset, chunk in read_range(fs, path, header["w"], start=1000, stop=5000):
        dest[offset : offset + chunk.numel()].copy_(chunk)   # flat elements [1000, 5000) of w, in chunks

Local files are memory-mapped and each chunk's pages are dropped again once it has been consumed (madvise), so a
process that streams a 16 GB checkpoint holds one chunk of it, not the pages it touched; remote files (s3://) are read
with ranged GETs of one chunk each. Nothing here imports Ray, DeepSpeed or MLflow.

The writer is the reverse: the header is computed from shapes and dtypes alone, then each tensor is produced, written
and dropped, so an export needs one tensor's memory, not one shard's.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 64 * 2**20  # the bounded buffer: one read of at most this many bytes is alive at a time
_ALIGN = 8  # safetensors pads the header so that the data starts 8-byte aligned

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor's bytes lie in its file (begin/end are absolute file offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return numel(self.shape)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------- reading


def read_header(fs, path: str) -> dict[str, TensorMeta]:
    """The tensors of one safetensors file: name -> TensorMeta (reads the header only)."""
    with fs.open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header length {length} bytes)")
        header = json.loads(f.read(length))
    data_start = 8 + length
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which expblip cannot read")
        begin, end = entry["data_offsets"]
        out[name] = TensorMeta(DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, data_start + end)
    return out


class MappedFiles:
    """Open read-only memory maps of local files, reused across reads and closed together (a context manager)."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                # ACCESS_COPY: a private mapping, which torch.frombuffer accepts as writable; nothing is ever written
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a chunk: the map closes when that is garbage-collected
                pass
        self._maps.clear()

    def __enter__(self) -> MappedFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_range(fs, path: str, meta: TensorMeta, start: int = 0, stop: int | None = None,
               maps: MappedFiles | None = None, chunk_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Flat elements [start, stop) of one tensor as (offset from start, 1-D chunk in the file's dtype) pairs.

    A chunk is valid only until the next one is requested (a local chunk's pages are released then): copy it.
    """
    stop = meta.numel if stop is None else min(stop, meta.numel)
    size = meta.dtype.itemsize
    step = max(1, (chunk_bytes or CHUNK_BYTES) // size)
    local = is_local(fs)
    own_maps = maps is None and local
    maps = MappedFiles() if own_maps else maps
    try:
        for first in range(start, stop, step):
            count = min(step, stop - first)
            offset = meta.begin + first * size
            if local:
                mm = maps.get(fs._strip_protocol(path))
                yield first - start, _frombuffer(mm, meta.dtype, count, offset)
                _release(mm, offset, count * size)
            else:
                data = fs.cat_file(path, start=offset, end=offset + count * size)
                yield first - start, _frombuffer(data, meta.dtype, count, 0)
    finally:
        if own_maps:
            maps.close()


def _frombuffer(buffer, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # bytes from a ranged GET are read-only; the chunk is only ever copied from
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)


def _release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Drop the mapped pages of [offset, offset + length) from this process (the page cache keeps the file)."""
    page = mmap.PAGESIZE
    first = offset // page * page
    if hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, offset + length - first)


def read_tensor(fs, path: str, meta: TensorMeta, maps: MappedFiles | None = None) -> torch.Tensor:
    """One whole tensor, copied out of the file (its own memory)."""
    out = torch.empty(meta.numel, dtype=meta.dtype)
    for offset, chunk in read_range(fs, path, meta, maps=maps):
        out[offset : offset + chunk.numel()].copy_(chunk)
    return out.reshape(meta.shape)


# ---------------------------------------------------------------- writing


@dataclass
class Planned:
    """One tensor to write: its name, dtype and shape now, its values when `produce()` is called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def plan_shards(items: Sequence[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def write_file(path: Path, items: Sequence[Planned], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, producing each tensor only while it is written; returns the data bytes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for item in items:
        if item.dtype not in DTYPE_NAMES:
            raise ValueError(f"{item.name}: dtype {item.dtype} cannot be written to safetensors")
        header[item.name] = {"dtype": DTYPE_NAMES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item in items:
            _write_tensor(f, item)
    return offset


def _write_tensor(f, item: Planned) -> None:
    tensor = item.produce().detach().to("cpu", item.dtype).contiguous()
    if tuple(tensor.shape) != tuple(item.shape):
        raise ValueError(f"{item.name}: produced shape {tuple(tensor.shape)}, planned {item.shape}")
    if tensor.numel():
        f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
