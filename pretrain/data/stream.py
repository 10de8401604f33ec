"""The global sample stream: which sample every row of every training step holds.

The stream is a pure function of (seed, the shard set's index, ``data.streams``, the global
batch): not of the number of nodes, ranks or loader workers (elastic determinism; MosaicML
streaming's canonical nodes are the anchor for order).

* An epoch is the shard list permuted with (seed, epoch) and read as one sequence of ``N``
  samples (index units: a sample lost to damage keeps its place as a :class:`Hole`).
* It is cut into ``C = data.streams`` contiguous, equal *streams* of ``L = N // C`` units (the
  last ``N mod C`` units of an epoch's order wait for another epoch); a stream may start or end
  inside a shard. Each stream goes through its own seeded shuffle buffer, flushed at the end of
  the epoch, so its ``t``-th item in an epoch is fixed.
* Row ``u`` of the run (``u = epoch x L + t``) is item ``t`` of every stream; a global batch of
  ``G = R x C`` samples is ``R`` consecutive rows, ordered column by column (stream 0's ``R``
  items, then stream 1's, ...). Rank ``r`` of ``W`` takes streams ``[r C/W, (r+1) C/W)``, which
  is one contiguous block of that order, and its micro batch ``i`` is the canonical micro batch
  ``r A + i`` (``A`` the accumulation steps): the same images whatever ``W`` is. Workers only
  decide who decodes which stream.
* Resume state is the number of rows consumed: every stream restarts at item ``u mod L`` of epoch
  ``u // L`` on any world size, reading (without decoding) up to where it was.

Shard sets without per-shard counts (remote URLs without an index) cannot be cut into equal
ranges: there stream ``c`` reads the shards ``c, c + C, ...`` of each epoch's order whole, its
epochs of its own length, and the resume state keeps every stream's (epoch, item). The rows
are still independent of ranks and workers; only the epoch boundaries differ between streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pretrain.core.errors import UserError
from pretrain.data.shard_sets import ShardSet
from pretrain.data.shards import ShardReadError, TarSample, is_remote, iter_tar_samples, shard_label


def seeded(*parts) -> random.Random:
    """A Random whose state depends only on ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    seeded("shards", seed, epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class Retry:
    """How a remote shard read survives an outage (``data.retries``, ``data.retry_max_s``,
    ``data.read_timeout_s``): after a failure that is worth retrying (``unreachable``), wait
    ``first_s``, doubling up to ``max_s`` per wait, at most ``retries`` times in a row (the count
    starts again once a sample arrives), then count the rest of the shard as lost."""

    retries: int = 8
    max_s: float = 30.0
    timeout_s: float = 60.0
    first_s: float = 0.5

    def wait_s(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * 2 ** attempt)

    @property
    def window_s(self) -> float:
        """The longest outage a read rides out without losing a sample (waits only)."""
        return sum(self.wait_s(a) for a in range(self.retries))


def read_shard(url: str, expected: int | None, lost: dict, retry: Retry | None = None) -> Iterator[TarSample]:
    """Samples of one shard. A remote read that fails with ``unreachable`` is retried per
    ``retry`` and continues at the sample where it stopped (reopened at that sample's first
    byte; nothing already yielded is yielded again). A shard that ends early adds the samples it
    lost to ``lost[(reason, shard name)]``: ``missing_shard`` (its whole count), ``unreachable``
    or ``truncated_shard`` (its index count minus those read; at least 1 when the count is
    unknown). A local tar must end with its end-of-archive blocks, so a cut between two members
    is caught too."""
    retry = retry or Retry()
    read, attempt, last = 0, 0, None
    while True:
        offset = last.offset if last is not None else 0
        try:
            for sample in iter_tar_samples(url, check_end=True, offset=offset, timeout_s=retry.timeout_s):
                if last is not None and offset and sample.offset == last.offset:
                    continue  # the sample the failed read already gave
                read += 1
                attempt = 0
                last = sample
                yield sample
            break
        except ShardReadError as err:
            if is_remote(url) and err.reason == "unreachable" and attempt < retry.retries:
                wait = retry.wait_s(attempt)
                attempt += 1
                print(f"data: {shard_label(url)} after {read} samples: {err}; retry {attempt}/{retry.retries} "
                      f"in {wait:g} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                continue
            key = (err.reason, shard_label(url))
            lost[key] = lost.get(key, 0) + (max(1, expected - read) if expected is not None else 1)
            return
    if expected is not None and read < expected:
        key = ("truncated_shard", shard_label(url))
        lost[key] = lost.get(key, 0) + expected - read


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer of ``buffer`` items, flushed (in random order) at the end."""
    if buffer <= 1:
        yield from items
        return
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(len(pool))
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool




@dataclass(frozen=True)
class Hole:
    """The place of a sample that could not be read (``reason``: ``missing_shard``,
    ``unreachable``, ``truncated_shard``) in a stream; it keeps the stream's positions fixed."""

    reason: str
    shard: str
    key: str = ""


@dataclass(frozen=True)
class StreamItem:
    """Item ``index`` of a stream in ``epoch``: a sample, or a :class:`Hole`."""

    epoch: int
    index: int
    unit: TarSample | Hole


def auto_streams(global_batch: int, shards: int, world: int) -> int:
    """``data.streams`` when not set: among the divisors of the global batch that are at most
    ``max(64, world)`` and at most the number of shards (so streams rarely share a shard) and that
    the world divides, the one with the largest power-of-two factor, then the largest. For a
    world that is a power of two the choice does not depend on it (1, 2, 4, ... ranks all get the
    same streams); a resume keeps the checkpoint's streams in any case."""
    cap = max(1, min(max(64, world), shards))
    fits = [c for c in range(1, min(cap, global_batch) + 1) if global_batch % c == 0 and c % world == 0]
    return max(fits, key=lambda c: (c & -c, c)) if fits else world


@dataclass(frozen=True)
class Streams:
    """The canonical layout of one shard set: ``count`` streams of ``rows`` items per step."""

    shards: ShardSet
    seed: int
    count: int  # C
    rows: int  # R = G / C

    @property
    def counts(self) -> tuple[int, ...] | None:
        """Samples per shard as an index says (estimates from ``data.samples_per_epoch`` are not)."""
        return None if self.shards.estimated else self.shards.counts

    @property
    def per_epoch(self) -> int | None:
        """``L``: items of each stream per epoch (None: the set has no per-shard counts)."""
        return None if self.counts is None else sum(self.counts) // self.count

    def start(self, rows: int) -> tuple[int, int]:
        """(epoch, item) every stream of a counted set is at after ``rows`` rows."""
        return divmod(rows, self.per_epoch)

    def pieces(self, epoch: int, c: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, samples) that stream ``c`` reads in ``epoch``, in order."""
        order = epoch_order(len(self.shards.urls), self.seed, epoch)
        counts = self.counts
        if counts is None:
            return [(i, 0, -1) for i in order[c::self.count]]
        begin, end, at, out = c * self.per_epoch, (c + 1) * self.per_epoch, 0, []
        for i in order:
            lo, hi = max(begin, at), min(end, at + counts[i])
            if lo < hi:
                out.append((i, lo - at, hi - lo))
            at += counts[i]
            if at >= end:
                break
        return out

    def shard_names(self, epoch: int, c: int) -> list[str]:
        return [shard_label(self.shards.urls[i]) for i, _, _ in self.pieces(epoch, c)]

    def units(self, epoch: int, c: int, retry: Retry | None = None) -> Iterator[TarSample | Hole]:
        """Stream ``c``'s samples of ``epoch`` in reading order, a :class:`Hole` for each one lost."""
        counts = self.counts
        for i, first, n in self.pieces(epoch, c):
            url = self.shards.urls[i]
            yield from _shard_units(url, counts[i] if counts else None, first, n, retry)

    def items(self, c: int, start: tuple[int, int], buffer: int, retry: Retry | None = None) -> Iterator[StreamItem]:
        """Stream ``c`` from item ``start[1]`` of epoch ``start[0]`` on, endlessly; items before the
        start are read through the shuffle buffer again but not yielded (nor decoded)."""
        epoch, skip = start
        while True:
            produced, rng = 0, seeded("buffer", self.seed, epoch, c)
            for t, unit in enumerate(shuffled(self.units(epoch, c, retry), buffer, rng)):
                produced += 1
                if t >= skip:
                    yield StreamItem(epoch, t, unit)
            if produced == 0:
                raise UserError(f"data.train: stream {c} of {self.count} has no samples in epoch {epoch} (shards "
                                f"{', '.join(self.shard_names(epoch, c)[:5]) or 'none'}); lower data.streams")
            epoch, skip = epoch + 1, 0


def _shard_units(url: str, count: int | None, first: int, n: int, retry: Retry | None) -> Iterator[TarSample | Hole]:
    """Samples ``first .. first + n`` of a shard (``n`` -1: to its end), with a :class:`Hole` for
    each one its index counts that could not be read."""
    lost: dict = {}
    got, reader = 0, read_shard(url, count, lost, retry)
    try:
        for j, sample in enumerate(reader):
            if j < first:
                continue
            got += 1
            yield sample
            if got == n:
                break
    finally:
        with contextlib.suppress(Exception):  # stopping early: a pipe: command may complain at close
            reader.close()
    missing = (n - got) if n >= 0 else (1 if lost else 0)
    reason = next(iter(lost), ("truncated_shard",))[0]
    for _ in range(max(0, missing)):
        yield Hole(reason, shard_label(url))


def mixture_columns(counts: list[int]) -> tuple[tuple[int, int], ...]:
    """Global stream -> (source, its stream) for sources of ``counts[s]`` streams each, spread so
    every stretch of consecutive streams (a rank's block) holds the sources about in proportion:
    source s's k-th stream sits at (k + 1/2) / counts[s] of the way."""
    keyed = sorted(((k + 0.5) / n, s, k) for s, n in enumerate(counts) for k in range(n))
    return tuple((s, k) for _, s, k in keyed)


def split_streams(total: int, weights: list[float], names: list[str]) -> list[int]:
    """``total`` streams shared among sources in proportion to ``weights`` (largest remainder,
    at least one each): a source's share of every global batch is its streams / ``total``."""
    if total < len(weights):
        raise UserError(f"data.train mixes {len(weights)} sources but has only {total} streams: set data.streams "
                        f"to at least {len(weights)} (a divisor of train.global_batch)")
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > total:
        counts[max(range(len(counts)), key=lambda i: counts[i] - exact[i])] -= 1
    for i in sorted(range(len(counts)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    for n, name in zip(counts, names, strict=True):
        if n < 1:
            raise UserError(f"data.train: source {name} gets no stream of {total}: raise its weight or data.streams")
    return counts


@dataclass(frozen=True)
class Mixture:
    """The global streams of a run: one :class:`Streams` per source of ``data.train`` and which
    global stream is which source's (:func:`mixture_columns`); a single source is a mixture of one.
    Source ``s`` supplies ``streams_s x rows`` samples of every step, exactly, and cycles through
    its own epochs (a small source with a large weight repeats sooner)."""

    sources: tuple[Streams, ...]
    names: tuple[str, ...]
    columns: tuple[tuple[int, int], ...]
    rows: int

    @property
    def count(self) -> int:
        return len(self.columns)

    @property
    def counted(self) -> bool:
        """Every source has per-shard counts (positions follow from the rows consumed)."""
        return all(s.per_epoch is not None for s in self.sources)

    def start(self, c: int, rows: int) -> tuple[int, int] | None:
        """(epoch, item) global stream ``c`` is at after ``rows`` rows (None: its source is not counted)."""
        source = self.sources[self.columns[c][0]]
        return source.start(rows) if source.per_epoch is not None else None

    def items(self, c: int, start: tuple[int, int], buffer: int, retry: Retry | None = None) -> Iterator[StreamItem]:
        s, k = self.columns[c]
        return self.sources[s].items(k, start, buffer, retry)

    def shard_names(self, epoch: int, c: int) -> list[str]:
        s, k = self.columns[c]
        return self.sources[s].shard_names(epoch, k)

    def source_of(self, c: int) -> str:
        return self.names[self.columns[c][0]]

    def weights(self) -> dict[str, float]:
        """Each source's exact share of every global batch."""
        return {name: sum(1 for s, _ in self.columns if s == i) / self.count for i, name in enumerate(self.names)}
