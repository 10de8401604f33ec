"""In what order every rank and dataloader worker reads the shards of a :class:`ShardSet`.

Data order is a pure function of (seed, epoch, position):

* ``epoch_order`` permutes the shard list with the seed, anew every epoch;
* shard ``i`` of that order goes to *slot* ``i % (world x workers)``; slot ``rank x W + w`` is
  dataloader worker ``w`` of rank ``rank``. Slots never share a shard, so ranks and workers
  see disjoint samples whose union is the epoch;
* a slot reads its shards in order through a seeded shuffle buffer that is flushed at the end of
  each epoch, so epochs are independent and a slot's stream can be fast-forwarded by whole
  epochs using the per-shard sample counts of ``index.json``, then sample by sample inside the
  epoch *without decoding images*.
"""

from __future__ import annotations

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


def slot_shards(n: int, seed: int, epoch: int, slot: int, nslots: int) -> list[int]:
    """Indices of the shards slot ``slot`` of ``nslots`` reads in ``epoch``, in reading order."""
    return epoch_order(n, seed, epoch)[slot::nslots]


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


@dataclass
class StreamItem:
    """One sample of a slot's stream. ``index``: its place in the slot's epoch (seeds its
    augmentation); ``position``: samples of the slot consumed so far in index units, this one and
    every sample lost to a damaged shard included (what a checkpoint records)."""

    epoch: int
    index: int
    position: int
    sample: TarSample


def slot_stream(shards: ShardSet, seed: int, slot: int, nslots: int, buffer: int, start: int,
                bad: dict, retry: Retry | None = None) -> Iterator[StreamItem]:
    """Endless stream of one slot from ``position == start`` on: whole epochs are skipped
    arithmetically from the index counts, the rest is read through the buffer without decoding.

    Samples lost to damaged shards count in the position, so a resume lands on the same sample
    even after losses, and are added to ``bad[(reason, shard)]`` when they fall after ``start``
    (losses before it were counted by the run that wrote the checkpoint)."""
    n, counts = len(shards.urls), shards.counts
    epoch, base = 0, 0  # base: position at the start of ``epoch``
    if counts is not None:
        while True:
            per_epoch = sum(counts[i] for i in slot_shards(n, seed, epoch, slot, nslots))
            if per_epoch == 0 or start - base < per_epoch:
                break
            base += per_epoch
            epoch += 1
    while True:
        order = slot_shards(n, seed, epoch, slot, nslots)
        lost: dict = {}
        raw = (s for i in order for s in read_shard(shards.urls[i], counts[i] if counts else None, lost, retry))
        produced = lost_total = 0
        for idx, sample in enumerate(shuffled(raw, buffer, seeded("buffer", seed, epoch, slot))):
            produced += 1
            new = sum(lost.values())  # lost while this sample was read: counted with it
            position = base + idx + 1 + lost_total + new
            lost_total += _drain(lost, bad if position > start else None)
            if position > start:
                yield StreamItem(epoch, idx, position, sample)
        lost_total += _drain(lost, bad)
        if produced == 0:
            names = ", ".join(shard_label(shards.urls[i]) for i in order[:5]) + (" ..." if len(order) > 5 else "")
            why = ", ".join(f"{n} {reason}" for (reason, _), n in sorted(bad.items())) or "no samples in them"
            raise UserError(f"slot {slot} read no samples in epoch {epoch} from its shards {names} ({why}); "
                            f"check them with `vitscale shards verify`")
        base += sum(counts[i] for i in order) if counts is not None else produced + lost_total
        epoch += 1


def _drain(lost: dict, into: dict | None) -> int:
    """Move ``lost`` counts into ``into`` (None: drop them); return how many there were."""
    total = sum(lost.values())
    if into is not None:
        for key, k in lost.items():
            into[key] = into.get(key, 0) + k
    lost.clear()
    return total
