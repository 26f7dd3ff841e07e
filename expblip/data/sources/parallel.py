"""Parallel conversion (``make_shards --workers N``): the same shards and manifest as one process, on N processes.

    with parallel_encoder(workers=2, resize=256) as encoder:      # None for one process
        source = records("table", table="faces.csv", ...)         # made inside: its Skips queue their counting
        write_shards(source, out, resize=256, encoder=encoder)

The main process streams the source in order: labels, captions and each image's reference. The table source's
images come as :class:`~._common.DeferredImage` (read_image defers while the skips do); other sources' as their
bytes or PIL image. Records go out in chunks of CHUNK to a pool of N processes, which read, check, resize and encode
them (shards.encode_record), the expensive part. The writer takes the results back in the source's order, so record
order, shard boundaries and every tar member's bytes are those of one process. At most IN_FLIGHT chunks per worker
are out at once: memory stays bounded whatever the input's size.

The source's own skips (queued by deferred_skips) and the ones the workers count are replayed in record order. The
counts, the examples an error names, the log lines and the --max-skipped judgement are therefore one process's.
An error is raised when the writer reaches the record that caused it, whether a worker or the source raised it,
after the records before it are written: the same one-line error, and convert discards the partial manifest as in
one process. A worker that dies (out of memory, killed) stops the conversion with a ChildProcessError; the shards
finished so far stay resumable.

Workers start from a fork server (Python's forkserver start method), never by forking the converting process,
which may hold threads (tqdm's monitor, s3fs's event loop).

On a Ray cluster (``make_shards --ray ADDRESS``, :func:`ray_encoder`) the chunks are Ray tasks instead, as many in
flight as the cluster has CPUs (IN_FLIGHT each): any node reads, checks, resizes and encodes, and the writer here
takes the results back in order, so the shards and manifest are byte for byte the local run's. The images a source
names must be readable from every node (a shared filesystem or s3://, with credentials the nodes hold themselves:
none travel from here).
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field

from expblip.data.shards import encode_record
from expblip.data.sources._common import ConversionError, Deferral, DeferredImage, deferred_skips

CHUNK = 16  # records per task: enough to amortise the round trip, few enough to keep the workers even
IN_FLIGHT = 2  # chunks out per worker: one being encoded, one waiting, so no worker idles between chunks
CHECK_ONLY = "check_only"  # a record key: read the deferred image (counting a bad one), write nothing
Encoder = Callable[[Iterator[dict]], Iterator[dict]]


class _Recorder:
    """A worker's stand-in for the source's Skips: keeps what a DeferredImage's read counted, for the writer."""

    deferral = None  # read_image defers only when this is set

    def __init__(self) -> None:
        self.added: list[tuple[str, str]] = []

    def add(self, reason: str, detail: str) -> None:
        self.added.append((reason, detail))


def _portable(exn: Exception) -> Exception:
    """``exn`` if it survives pickling back to the writer (LabelError's signature does not), else a ConversionError
    with its message: the one-line error stays the same."""
    try:
        pickle.loads(pickle.dumps(exn))
        return exn
    except Exception:
        return ConversionError(str(exn))


def check_only(record: dict) -> dict:
    """A record that a filter after the source leaves out (convert.carve_validation), kept in the stream when its
    image is deferred: one process read that image in the source and counted it if bad, so a worker reads it too;
    it is never written."""
    return {**record, CHECK_ONLY: True}


def encode_chunk(records: list[dict], resize: int) -> list[tuple[str, object]]:
    """In a worker: each record → ("sample", sample) | ("skipped", [(reason, detail)]) | ("checked", None) |
    ("error", exception), stopping at the first error (the records after it are never written)."""
    out: list[tuple[str, object]] = []
    for record in records:
        try:
            image = record.get("image")
            if isinstance(image, DeferredImage):
                recorder = _Recorder()
                image = image.read(recorder)
                if image is None:
                    out.append(("skipped", recorder.added))
                    continue
                record = {**record, "image": image}
            if record.get(CHECK_ONLY):
                out.append(("checked", None))
                continue
            out.append(("sample", encode_record(record, resize)))
        except Exception as exn:  # raised by the writer at this record, as one process would
            out.append(("error", _portable(exn)))
            break
    return out


@dataclass
class _Chunk:
    """CHUNK records for a worker, and what the writer does around them, in the source's order."""

    payload: list[dict] = field(default_factory=list)  # the records, images deferred or as the source gave them
    # ("events", [queued skip events]) | ("record", (the source's Skips or None, repeat)) | ("raise", the error);
    # repeat: the record shares the previous record's DeferredImage (a multi-turn LLaVA record's turns)
    layout: list[tuple[str, object]] = field(default_factory=list)


def _chunks(records: Iterator[dict], deferral: Deferral) -> Iterator[_Chunk]:
    """The source cut into chunks; the skips it queued while making a record go just before that record."""
    last = None  # the previous record's image
    while True:
        chunk = _Chunk()
        while len(chunk.payload) < CHUNK:
            try:
                record = next(records)
            except StopIteration:  # the source's finish() is among the last events
                chunk.layout.append(("events", deferral.take()))
                yield chunk
                return
            except Exception as exn:  # a bad label, a refused layout: raised when the writer gets here
                chunk.layout += [("events", deferral.take()), ("raise", exn)]
                yield chunk
                return
            chunk.layout.append(("events", deferral.take()))
            image = record.get("image")
            skips = image.skips if isinstance(image, DeferredImage) else None
            if skips is not None:  # the Skips stays here; the worker gets only the read
                record = {**record, "image": DeferredImage(image.read, None)}
            chunk.layout.append(("record", (skips, skips is not None and image is last)))
            chunk.payload.append(record)
            last = image
        yield chunk


def _merge(chunk: _Chunk, results: list[tuple[str, object]], failed: Counter) -> Iterator[dict]:
    """The chunk's samples in order, its skip events and the workers' skips replayed, its error raised in place.
    ``failed``: per source Skips, the records a worker skipped (its source counted them as kept)."""
    outcomes = iter(results)
    for kind, value in chunk.layout:
        if kind == "events":
            for event in value:
                Deferral.replay(event, failed[id(event[0])])
        elif kind == "raise":
            raise value
        else:
            outcome, payload = next(outcomes)
            if outcome == "error":
                raise payload
            if outcome == "sample":
                yield payload
                continue
            if outcome == "checked":
                continue
            skips, repeat = value
            failed[id(skips)] += 1  # its source counted it kept
            for reason, detail in [] if repeat else payload:  # one image read once: one skip, as in one process
                Deferral.replay((skips, "add", reason, detail))


def _result(future: Future) -> list[tuple[str, object]]:
    try:
        return future.result()
    except BrokenProcessPool as exn:
        raise ChildProcessError(f"a conversion worker process died ({exn}): out of memory or killed? Re-run the same "
                                "command (with fewer --workers) to resume from the last finished shard") from None
    except Exception as exn:
        if type(exn).__module__.startswith("ray."):  # a Ray task's worker or node was lost
            raise ChildProcessError(f"a conversion task on the Ray cluster failed ({type(exn).__name__}: "
                                    f"{str(exn).splitlines()[0] if str(exn) else ''}). Re-run the same command to "
                                    "resume from the last finished shard") from None
        raise


def _encode(pool: ProcessPoolExecutor, workers: int, resize: int, deferral: Deferral,
            records: Iterator[dict]) -> Iterator[dict]:
    """``records`` → samples in their order, encoded by ``pool``; at most IN_FLIGHT chunks per worker out."""
    chunks = _chunks(iter(records), deferral)
    window: deque[tuple[_Chunk, Future | None]] = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            window.append((chunk, pool.submit(encode_chunk, chunk.payload, resize) if chunk.payload else None))

    for _ in range(workers * IN_FLIGHT):
        submit()
    failed: Counter = Counter()
    while window:
        chunk, future = window.popleft()
        results = _result(future) if future is not None else []
        submit()  # before writing: the workers stay busy while this chunk is written
        yield from _merge(chunk, results, failed)


def _context() -> multiprocessing.context.BaseContext:
    """A fork server with the encoding modules preloaded: workers start fast and never fork this process's threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["expblip.data.sources.parallel", "expblip.data.sources.table"])
    return ctx


class _RayTasks:
    """The part of ProcessPoolExecutor that _encode uses, on a Ray cluster: each chunk a Ray task."""

    def __init__(self) -> None:
        import ray

        self._encode = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(encode_chunk)  # over every node
        self._out: dict[Future, object] = {}  # the tasks not yet taken back: future -> ObjectRef

    def submit(self, fn: Callable, *args) -> Future:
        assert fn is encode_chunk
        ref = self._encode.remote(*args)
        future = ref.future()
        self._out[future] = ref
        future.add_done_callback(lambda done: self._out.pop(done, None))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """With ``cancel_futures``, the tasks still out (a conversion that stopped early) are cancelled."""
        import ray

        for ref in list(self._out.values()) if cancel_futures else []:
            ray.cancel(ref)


@contextmanager
def ray_encoder(address: str, resize: int = 0) -> Iterator[Encoder]:
    """Attach to the Ray cluster at ``address`` ("auto", "ray://HOST:10001", "HOST:6379", or "local" for one
    started here) and yield an encoder for write_shards whose chunks are Ray tasks; sources made inside the block
    defer their skips and the table source its images, as with --workers. Ray is shut down on leaving the block
    when this call attached it."""
    import logging

    import ray

    attached = not ray.is_initialized()
    if attached:
        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 include_dashboard=False if address == "local" else None)
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        with deferred_skips() as deferral:
            tasks = _RayTasks()
            try:
                yield lambda records: _encode(tasks, cpus, resize, deferral, records)
            finally:
                tasks.shutdown(cancel_futures=True)
    finally:
        if attached:
            ray.shutdown()


@contextmanager
def parallel_encoder(workers: int, resize: int = 0) -> Iterator[Encoder | None]:
    """For ``workers`` > 1: a pool of that many processes and an encoder for write_shards (records → samples in
    order); sources made inside the block defer their skips and the table source its images. None for one process.
    The pool is shut down on leaving the block (chunks still queued are cancelled)."""
    if workers <= 1:
        yield None
        return
    with deferred_skips() as deferral:
        pool = ProcessPoolExecutor(workers, mp_context=_context())
        try:
            yield lambda records: _encode(pool, workers, resize, deferral, records)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
