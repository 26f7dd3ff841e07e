"""Gather concurrent requests into one ``generate`` call: a bounded queue in front of one model copy.

    batcher = Batcher(captioner.caption_pixels, max_batch=16, max_wait_s=0.025, max_queue=256)
    captions = await batcher.caption(pixels, gen, prompt="", timeout_s=60)   # pixels [k, 3, S, S]: k images
    batcher.close()

One worker thread owns the model. When free, it takes the oldest queued image and waits at most ``max_wait_s`` for
up to ``max_batch`` images with the same decoding settings and prompt; then it captions them
in one call. Images with other settings wait for a batch of their own. It waits only when there is something to wait
for: requests on their way in (announced with ``arrival()``: being read or decoded, not yet queued), or load (the
previous batch held several images; closed-loop clients answered by it are about to send again). A lone client is
not held back. While a batch runs, new requests queue, so under load the next batch fills by itself. A request's images are admitted together or not at all: when the queue
holds ``max_queue`` images, ``submit`` raises QueueFull at once (the HTTP app answers 503 with Retry-After). A request
that times out is cancelled: its images leave the queue, or its answer is dropped if its batch already runs.

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field

import torch

from expblip.model.generation import GenerationConfig
from expblip.pixels import as_batch

# How long a free worker waits for more images under load. 25 ms, not 10: with 16 closed-loop clients and a trained
# export, 10 ms let the first client answered by a batch run alone and split the rest (batches of 1 and 13-16
# alternating): bench/serve_load.py measured 3.73 and 3.82 at 10 ms against 5.70 and 4.64 at 25 ms, alternating runs.
DEFAULT_MAX_WAIT_MS = 25.0

# (pixels [B,3,S,S], or a list of [3,H_i,W_i] at dynamic resolution, gen, prompt) -> captions
CaptionFn = Callable[[torch.Tensor | list[torch.Tensor], GenerationConfig, str], list[str]]


class QueueFull(RuntimeError):
    """The queue cannot take a request's images now; ``retry_after_s`` estimates when it can."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    """One image waiting for its caption."""

    pixels: torch.Tensor  # [3, S, S] ([3, H, W] at dynamic resolution)
    gen: GenerationConfig
    prompt: str
    key: tuple  # decoding settings + prompt: only items with equal keys share a batch
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the worker reports after each batch (for /metrics): images in it and seconds it took."""

    size: int
    seconds: float


class Arrival:
    """A request announced to the batcher; ``done()`` (idempotent) once its images are queued or it gave up."""

    def __init__(self, batcher: Batcher):
        self._batcher, self._open = batcher, True
        batcher._arrive(1)

    def done(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arrive(-1)


class Batcher:
    """A bounded queue of images and the one thread that captions them in batches."""

    def __init__(self, caption_fn: CaptionFn, max_batch: int = 16, max_wait_s: float = DEFAULT_MAX_WAIT_MS / 1000,
                 max_queue: int = 256, on_batch: Callable[[BatchStats], None] | None = None):
        if max_batch < 1 or max_queue < max_batch or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= max_batch and max_wait_s >= 0; got max_batch "
                             f"{max_batch}, max_queue {max_queue}, max_wait_s {max_wait_s}")
        self.caption_fn, self.max_batch, self.max_wait_s, self.max_queue = caption_fn, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._arriving = 0  # requests announced with arrival() and not yet queued
        self._last_size = 0  # images in the previous batch: more than one means load
        self._batch_seconds = 1.0  # running estimate of one batch's time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="expblip-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the request side

    @property
    def queued(self) -> int:
        """Images waiting (not yet in a running batch)."""
        with self._cond:
            self._drop_cancelled()
            return len(self._pending)

    def submit(self, pixels: torch.Tensor | Sequence[torch.Tensor], gen: GenerationConfig,
               prompt: str = "") -> list[Future]:
        """Queue ``pixels`` [k, 3, S, S] or k tensors [3, H_i, W_i] (dynamic resolution; k >= 1); one future per
        image, resolving to its caption (images of other sizes batch together as a list). QueueFull when the queue
        cannot take all k now; ValueError when k alone exceeds the queue."""
        shapes = [tuple(p.shape) for p in pixels]
        if not shapes or any(len(s) != 3 for s in shapes):
            raise ValueError(f"submit() takes pixels [k, 3, S, S] or k tensors [3, H, W] with k >= 1, got "
                             f"{shapes[:4] or 'none'}")
        if len(pixels) > self.max_queue:
            raise ValueError(f"{len(pixels)} images in one request is more than the queue holds ({self.max_queue})")
        key = (astuple(gen), prompt)
        items = [_Item(p, gen, prompt, key) for p in pixels]
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._drop_cancelled()
            if len(self._pending) + len(items) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._pending)} of {self.max_queue} images waiting); "
                                "retry later", self._retry_after(len(self._pending)))
            self._pending.extend(items)
            self._cond.notify_all()
        return [item.future for item in items]

    def arrival(self) -> Arrival:
        """Announce a request that is on its way in (being read or decoded): a forming batch may wait for it until
        ``Arrival.done()`` (see the module docstring)."""
        return Arrival(self)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """``arrival()`` for the block."""
        arrival = self.arrival()
        try:
            yield
        finally:
            arrival.done()

    def _arrive(self, n: int) -> None:
        with self._cond:
            self._arriving += n
            self._cond.notify_all()

    async def caption(self, pixels: torch.Tensor, gen: GenerationConfig, prompt: str = "",
                      timeout_s: float | None = None) -> list:
        """Captions of ``pixels`` [k, 3, S, S]; TimeoutError (the images cancelled) after ``timeout_s``."""
        return await self.wait(self.submit(pixels, gen, prompt), timeout_s)

    async def wait(self, futures: list[Future], timeout_s: float | None = None) -> list:
        """The results of submitted futures; TimeoutError (all of them cancelled) after ``timeout_s``."""
        try:
            return list(await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), timeout_s))
        except BaseException:  # timeout, client gone, error in the batch: nothing more to do for these images
            for future in futures:
                future.cancel()
            raise

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _retry_after(self, waiting: int) -> int:
        return max(1, math.ceil((waiting / self.max_batch + 1) * self._batch_seconds))

    def _drop_cancelled(self) -> None:
        if any(item.future.cancelled() for item in self._pending):
            self._pending = deque(item for item in self._pending if not item.future.cancelled())

    # ------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        """The next batch (possibly empty when all its images were cancelled); None once closed and drained."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = time.monotonic() + self.max_wait_s  # from now: images queued behind a batch waited already
            while (not self._closed and (self._arriving or self._last_size > 1)
                   and self._count(first.key) < self.max_batch and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch = self._take(first.key)
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _count(self, key: tuple) -> int:
        return sum(item.key == key for item in self._pending)

    def _take(self, key: tuple) -> list[_Item]:
        """Up to max_batch queued items with ``key``, oldest first, removed from the queue."""
        batch: list[_Item] = []
        rest: deque[_Item] = deque()
        for item in self._pending:
            (batch if item.key == key and len(batch) < self.max_batch else rest).append(item)
        self._pending = rest
        return batch

    def _run(self, batch: Sequence[_Item]) -> None:
        start = time.monotonic()
        try:
            captions = self.caption_fn(as_batch([item.pixels for item in batch]), batch[0].gen, batch[0].prompt)
        except Exception as err:  # every request of the batch learns why
            for item in batch:
                item.future.set_exception(err)
        else:
            for item, caption in zip(batch, captions, strict=True):
                item.future.set_result(caption)
        seconds = time.monotonic() - start
        self._last_size = len(batch)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(batch), seconds))
