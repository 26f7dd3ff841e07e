"""The order in which training consumes samples: one seeded sequence, the same for any number of ranks and workers.

An epoch's samples form one global sequence; epochs follow each other, so a run is a walk along positions 0, 1, 2, …
of an endless sequence, and a single number (samples consumed) says where it stands at any world size. At world
size W with per-rank batch B, step after step each rank takes the next B positions: rank r's j-th batch since the
walk started at position P0 is positions [P0 + (j·W + r)·B, +B). A resume at another W continues at the same position.

How an epoch's sequence is built, so that readers stream tar shards sequentially and read each shard once:

    shards          seeded order (seed, epoch); with ``resampled``, drawn with replacement
    lanes           shard k goes to lane k mod L (L = min(lanes, shards)); a lane is its shards end to end
    tail            the first t samples of every lane (t = its length beyond the head, often under B): what does
                    not fill whole batches, as read, lane after lane. At the front of the lanes, a reader that
                    needs another lane's tail reads a few samples of its first shard, not the whole lane
    head            the other m samples of every lane (m: a multiple of B, about the shortest lane), permuted
                    within consecutive windows of ``window`` samples (seeded by seed, epoch, lane, window: the
                    shuffle a reader's buffer can apply exactly), as chunks of B taken round-robin: lane 0 chunk 0,
                    lane 1 chunk 0, …, lane 0 chunk 1, …
    the epoch       fill + head chunks + the rest of the tail. The fill is the first samples of the tail, as many
                    as the epoch starts off the B grid (epoch sizes need not be multiples of B), so that its head
                    chunks are whole batches

A batch is then one head chunk: one lane, B consecutive (window-shuffled) samples. Reader q of R = W × data
workers takes batches q, q + R, …, so when R divides L every reader owns whole lanes and opens each of its shards
once; otherwise readers share lanes and skip what is not theirs (correct, more bytes read).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Piece:
    """``n`` consecutive samples of one lane of one epoch, from lane position ``pos``."""

    epoch: int
    lane: int
    pos: int
    n: int


def _rng(*parts) -> random.Random:
    # A string seed goes through sha512: the same in every process and Python run (unlike hash()).
    return random.Random(":".join(str(p) for p in parts))


@lru_cache(maxsize=256)
def window_permutation(seed: int, epoch: int, lane: int, window: int, length: int) -> tuple[int, ...]:
    """perm[o] = offset within the window of the raw sample at shuffled offset o."""
    perm = list(range(length))
    _rng(seed, epoch, lane, window, "window").shuffle(perm)
    return tuple(perm)


class EpochPlan:
    """One epoch's sequence: which lane position each of its ``size`` samples is (see the module docstring)."""

    def __init__(self, epoch: int, start: int, shards: list[tuple[str, int]], lanes: int, batch_size: int):
        self.epoch, self.start, self.batch_size = epoch, start, batch_size
        n_lanes = max(1, min(lanes, len(shards)))
        self.lanes = [shards[k::n_lanes] for k in range(n_lanes)]  # (url, samples) of each lane, in reading order
        self.lane_len = [sum(c for _, c in lane) for lane in self.lanes]
        self.size = sum(self.lane_len)
        b, n = batch_size, len(self.lanes)
        fill = (-start) % b  # samples before the next multiple of B
        head = b * (min(self.lane_len) // b)
        if self.size - n * head < fill and head:  # the fill comes from the tail: make the tail long enough
            head -= b
        self.head, self.fill = head, min(fill, self.size - n * head)
        self.tails = [length - head for length in self.lane_len]  # lane positions [0, tail) are its tail
        self.tail_start = [sum(self.tails[:k]) for k in range(n)]  # where each lane's tail begins in the tail pool

    @property
    def end(self) -> int:
        return self.start + self.size

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """The samples at epoch-relative positions [lo, hi) as lane pieces, in sequence order."""
        out: list[Piece] = []
        t, head_end = lo, self.fill + len(self.lanes) * self.head
        while t < hi:
            if t < self.fill or t >= head_end:  # the fill, or the tail after the head
                u = t if t < self.fill else t - len(self.lanes) * self.head
                stop = min(hi, self.fill) if t < self.fill else hi
                piece = self._tail_piece(u, stop - t)
            else:
                chunk, offset = divmod(t - self.fill, self.batch_size)
                row, lane = divmod(chunk, len(self.lanes))
                piece = Piece(self.epoch, lane, self.tails[lane] + row * self.batch_size + offset,
                              min(self.batch_size - offset, hi - t))
            out.append(piece)
            t += piece.n
        return out

    def _tail_piece(self, u: int, n: int) -> Piece:
        """The tail-pool samples from index u, as far as one lane's tail (and ``n``) goes."""
        lane = bisect.bisect_right(self.tail_start, u) - 1
        while self.tails[lane] == 0:  # an empty tail shares its start with the next lane's
            lane += 1
        offset = u - self.tail_start[lane]
        return Piece(self.epoch, lane, offset, min(n, self.tails[lane] - offset))


class GlobalOrder:
    """The endless sequence over epochs: ``pieces(a, b)`` names the samples at global positions [a, b)."""

    def __init__(
        self, shards: list[str], counts: list[int], seed: int, lanes: int, batch_size: int, resampled: bool = False
    ):
        if len(shards) != len(counts):
            raise ValueError(f"{len(shards)} shards but {len(counts)} sample counts")
        if sum(counts) == 0:
            raise ValueError("the shards hold no samples")
        self.shards, self.counts, self.total = list(shards), list(counts), sum(counts)
        self.seed, self.lanes, self.batch_size, self.resampled = seed, lanes, batch_size, resampled
        self._starts = [0]  # start of epoch e, for every e computed so far
        self._plans: dict[int, EpochPlan] = {}

    def shard_order(self, epoch: int) -> list[tuple[str, int]]:
        pairs = list(zip(self.shards, self.counts, strict=True))
        rng = _rng(self.seed, epoch, "shards")
        if self.resampled:
            return [rng.choice(pairs) for _ in pairs]
        rng.shuffle(pairs)
        return pairs

    def epoch_size(self, epoch: int) -> int:
        return self.total if not self.resampled else sum(c for _, c in self.shard_order(epoch))

    def epoch_start(self, epoch: int) -> int:
        if not self.resampled:
            return epoch * self.total
        while len(self._starts) <= epoch:
            self._starts.append(self._starts[-1] + self.epoch_size(len(self._starts) - 1))
        return self._starts[epoch]

    def epoch_at(self, position: int) -> int:
        """The epoch holding global position ``position``."""
        if not self.resampled:
            return position // self.total
        epoch = 0
        while self.epoch_start(epoch + 1) <= position:
            epoch += 1
        return epoch

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            if len(self._plans) > 4:  # readers move forward: keep the few most recent epochs
                self._plans.pop(min(self._plans))
            self._plans[epoch] = EpochPlan(
                epoch, self.epoch_start(epoch), self.shard_order(epoch), self.lanes, self.batch_size
            )
        return self._plans[epoch]

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """The samples at global positions [lo, hi), possibly across an epoch boundary."""
        out, epoch = [], self.epoch_at(lo)
        while lo < hi:
            plan = self.plan(epoch)
            stop = min(hi, plan.end)
            out += plan.pieces(lo - plan.start, stop - plan.start)
            lo, epoch = stop, epoch + 1
        return out


def batch_start(origin: int, index: int, rank: int, world: int, batch_size: int) -> int:
    """Global position of the first sample of rank ``rank``'s ``index``-th batch of a walk that began at ``origin``."""
    return origin + (index * world + rank) * batch_size


def position_after(origin: int, index: int, world: int, batch_size: int) -> int:
    """Global position once every rank has consumed its ``index``-th batch (batches 0..index)."""
    return origin + (index + 1) * world * batch_size
