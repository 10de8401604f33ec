"""Where the shards are and in what order every rank and worker reads them (pure functions).

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

import glob
import hashlib
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrain.core.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, when known
    multi_label: bool | None = None
    num_classes: int | None = None

    @property
    def samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


@dataclass
class RawSample:
    key: str
    shard: str
    files: dict[str, bytes]


def seeded(*parts) -> random.Random:
    """A Random whose state depends only on ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _count_local_tar(path: str) -> int:
    keys = set()
    with tarfile.open(path, "r:") as tar:  # seeks over member data: reads headers only
        for member in tar:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def resolve_shards(spec: str, split: str, samples_per_epoch: int | None = None) -> ShardSet:
    """``spec`` is a folder written by ``vitscale shards write`` (its ``index.json`` names the
    ``split``'s shards and counts), a brace pattern or glob of local tars (counted by reading tar
    headers), or URLs WebDataset can open (``pipe:``, ``s3://`` ...; comma- or brace-separated),
    which need ``data.samples_per_epoch``."""
    p = Path(spec)
    if p.is_dir():
        index_path = p / "index.json"
        if index_path.is_file():
            from pretrain.data.shards import load_index

            index = load_index(p)
            part = index["splits"].get(split)
            if not part or not part.get("shards"):
                have = ", ".join(index["splits"]) or "none"
                raise UserError(f"{index_path} has no {split!r} split (it has: {have}): write one with "
                                f"`vitscale shards write SRC {p} --val-fraction 0.02`, or set data.{split} to "
                                f"another shard set")
            return ShardSet(tuple(str(p / s["file"]) for s in part["shards"]),
                            tuple(int(s["samples"]) for s in part["shards"]),
                            bool(index["multi_label"]), int(index["num_classes"]))
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if not tars:
            raise UserError(f"data.{split}={spec!r}: the folder holds no index.json and no .tar shards; "
                            f"write shards with `vitscale shards write SRC {spec}`")
        return ShardSet(tuple(tars), tuple(_count_local_tar(t) for t in tars))
    urls = _expand(spec)
    if not urls:
        raise UserError(f"data.{split}={spec!r} matches no shards: give a folder written by `vitscale shards "
                        f"write`, a brace pattern such as /data/in21k-{{000000..000127}}.tar, or URLs")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) == len(urls):
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise UserError(f"data.{split}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}: check the "
                            f"pattern {spec!r}")
        return ShardSet(tuple(urls), tuple(_count_local_tar(u) for u in urls))
    if not samples_per_epoch:
        raise UserError(f"data.{split}={spec!r} names remote shards without an index: set "
                        f"data.samples_per_epoch to the number of samples they hold")
    per = samples_per_epoch // len(urls)
    return ShardSet(tuple(urls), tuple([per] * len(urls)))


def _expand(spec: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for part in spec.split(","):
        for url in braceexpand.braceexpand(part.strip()):
            if any(c in url for c in "*?[") and "://" not in url:
                out.extend(sorted(glob.glob(url)))
            elif url:
                out.append(url)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    seeded("shards", seed, epoch).shuffle(order)
    return order


def slot_shards(n: int, seed: int, epoch: int, slot: int, nslots: int) -> list[int]:
    """Indices of the shards slot ``slot`` of ``nslots`` reads in ``epoch``, in reading order."""
    return epoch_order(n, seed, epoch)[slot::nslots]


def open_stream(url: str):
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_raw_samples(url: str, bad: dict) -> Iterator[RawSample]:
    """Samples of one shard, members grouped by key; a damaged tar ends the shard early and is
    counted in ``bad[("truncated_shard", url)]``."""
    name = url.rsplit("/", 1)[-1]
    current: RawSample | None = None
    try:
        with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("truncated member")
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = RawSample(key, name, {})
                current.files[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError):
        bad[("truncated_shard", name)] = bad.get(("truncated_shard", name), 0) + 1
        current = None
    if current is not None:
        yield current


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


def slot_stream(shards: ShardSet, seed: int, slot: int, nslots: int, buffer: int, skip: int,
                bad: dict) -> Iterator[tuple[int, int, RawSample]]:
    """Endless ``(epoch, index_in_epoch, sample)`` stream of one slot, starting after ``skip``
    samples (whole epochs are skipped arithmetically from the counts; the rest is read through
    the buffer without decoding)."""
    n = len(shards.urls)
    epoch = 0
    if shards.counts is not None:
        while True:
            per_epoch = sum(shards.counts[i] for i in slot_shards(n, seed, epoch, slot, nslots))
            if per_epoch == 0 or skip < per_epoch:
                break
            skip -= per_epoch
            epoch += 1
    while True:
        order = slot_shards(n, seed, epoch, slot, nslots)
        raw = (s for i in order for s in iter_raw_samples(shards.urls[i], bad))
        produced = 0
        for idx, sample in enumerate(shuffled(raw, buffer, seeded("buffer", seed, epoch, slot))):
            produced += 1
            if skip:
                skip -= 1
                continue
            yield epoch, idx, sample
        if produced == 0:
            raise UserError(f"slot {slot} read no samples in epoch {epoch}: its shards are empty or unreadable")
        epoch += 1
