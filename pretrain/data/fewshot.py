"""The data side of few-shot evaluation: which images a few-shot set holds, which of them a
(seed, k) subset uses, and a batch source that decodes only those.

A few-shot set is a shard set as ``data.train`` takes it (:func:`pretrain.data.shard_sets.resolve_shards`),
single-label. Its *rows* are its samples in canonical order: shard order of the set, then order
inside the shard; a row is named by ``(shard index, position)``. Everything below is a pure
function of the rows, so it does not depend on the number of ranks or workers:

- :func:`scan_labels` reads the labels of some shards without decoding images (local tars: from
  the headers, seeking over image bytes). Ranks scan shards ``i % world`` and share the result;
- :func:`class_orders` puts each class's rows in a random order fixed by ``(seed, class)``; the
  k-shot subset of a seed is the first k rows of every class (so the 5-shot subset holds the
  1-shot one, as in big_vision), a held-out part for choosing l2 follows the largest k;
- :func:`val_subset` is a fixed random subset of the val rows (``fewshot.max_val``);
- :class:`SelectedImages` yields micro batches of the wanted rows of one rank's shards (of every
  dataset and side at once) through the eval transform (uint8, normalised on the device),
  ``targets`` = the row ids; every rank yields the same number of batches (padding rows have
  ``valid=False``) so ZeRO-3 ranks stay in step.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.core.errors import UserError
from pretrain.data.batch import Batch
from pretrain.data.shard_sets import ShardSet, resolve_shards
from pretrain.data.shards import (
    IMAGE_EXTS,
    LABEL_EXTS,
    SampleError,
    ShardReadError,
    decode_label,
    image_bytes,
    is_remote,
    iter_tar_samples,
    shard_label,
    split_member_name,
)
from pretrain.data.stream import read_shard
from pretrain.data.transforms import eval_transform
from pretrain.data.workers import worker_options

_ANY_CLASS = 1 << 31  # the label range check happens against the set's class count afterwards


def resolve_fewshot_shards(source: str, split: str, key: str) -> ShardSet:
    """The shard set of one side of a few-shot dataset, checked to be single-label and labelled
    (from the index, or for a set without one, from its first sample); :class:`UserError` naming
    ``key`` and the fix otherwise."""
    shards = resolve_shards(source, split, key=key)
    if shards.multi_label:
        raise UserError(f"{key}={source!r}: the shards are multi-label; few-shot linear evaluation needs one "
                        f"label per image: give a single-label shard set")
    if shards.multi_label is None:  # no index: look at the first sample
        first = next(_first_samples(shards.urls[0]), None)
        if first is None:
            raise UserError(f"{key}={source!r}: its first shard {shard_label(shards.urls[0])} holds no sample; "
                            f"check it with `vitscale shards verify`")
        try:
            decode_label(first.files, _ANY_CLASS, multi_label=False)
        except SampleError as err:
            raise UserError(f"{key}={source!r}: sample {first.key} of {shard_label(shards.urls[0])} has no usable "
                            f"label ({err}); few-shot evaluation needs labelled shards: write them with "
                            f"`vitscale shards write` from an ImageFolder or a manifest with labels") from None
    return shards


def _first_samples(url: str):
    try:
        yield from iter_tar_samples(url)
    except ShardReadError as err:
        raise UserError(f"shard {url} cannot be read ({err}); check it with `vitscale shards verify`") from None


def prefix_shards(shards: ShardSet, limit: int | None) -> list[int]:
    """Indices of the shards that hold the first ``limit`` rows (all shards when None)."""
    if limit is None:
        return list(range(len(shards.urls)))
    out, total = [], 0
    for i, n in enumerate(shards.counts):
        if total >= limit:
            break
        out.append(i)
        total += n
    return out


def scan_labels(shards: ShardSet, shard_ids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """``{shard index: [(position, label), ...]}`` for the usable samples (an image and one
    label) of the given shards; a shard that cannot be read to its end keeps what was read."""
    return {i: list(_shard_labels(shards.urls[i])) for i in shard_ids}


def _shard_labels(url: str) -> Iterator[tuple[int, int]]:
    groups = _label_groups_local(url) if not is_remote(url) and Path(url).is_file() else _label_groups_stream(url)
    try:
        for pos, (files, has_image) in enumerate(groups):
            if not has_image:
                continue
            try:
                yield pos, int(decode_label(files, _ANY_CLASS, multi_label=False))
            except SampleError:
                continue
    except ShardReadError:
        return


def _label_groups_local(path: str) -> Iterator[tuple[dict[str, bytes], bool]]:
    """Per sample (members grouped by key, in order): its label files and whether it has an image,
    reading tar headers and label members only."""
    key, files, has_image = None, {}, False
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, ext = split_member_name(member.name)
                if name != key:
                    if key is not None:
                        yield files, has_image
                    key, files, has_image = name, {}, False
                kind = ext.rsplit(".", 1)[-1]
                if kind in LABEL_EXTS:
                    files[ext] = tar.extractfile(member).read()
                has_image = has_image or kind in IMAGE_EXTS
    except (tarfile.TarError, OSError) as err:
        raise ShardReadError(str(err)) from err
    if key is not None:
        yield files, has_image


def _label_groups_stream(url: str) -> Iterator[tuple[dict[str, bytes], bool]]:
    for sample in iter_tar_samples(url):
        labels = {k: v for k, v in sample.files.items() if k.rsplit(".", 1)[-1] in LABEL_EXTS}
        yield labels, sample.image() is not None


def class_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """For every class, its rows (indices into ``labels``) in a random order fixed by
    ``(seed, class)``: the first k are that class's k shots for this seed."""
    out = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        out.append(np.random.default_rng((seed, c)).permutation(rows))
    return out


def val_subset(n: int, limit: int | None) -> np.ndarray:
    """Sorted row indices of the val rows scored: all, or a fixed random ``limit`` of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


class _Selected(IterableDataset):
    """Worker ``w`` reads every ``readers``-th shard of each job; a batch never mixes jobs."""

    def __init__(self, jobs: list[list[tuple[str, dict[int, int]]]], micro: int, img_size: int, crop_pct: float,
                 readers: int):
        self.jobs, self.micro, self.img_size, self.crop_pct, self.readers = jobs, micro, img_size, crop_pct, readers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        torch.set_num_threads(1)
        for job, shards in enumerate(self.jobs):
            images, ids, bad = [], [], {}
            for url, want in shards[w::self.readers]:
                last = max(want)
                for pos, sample in enumerate(read_shard(url, None, bad)):
                    if pos > last:
                        break  # the rest of the shard is not needed
                    if pos not in want:
                        continue
                    try:
                        images.append(eval_transform(image_bytes(sample), self.img_size, self.crop_pct))
                        ids.append(want[pos])
                    except Exception as err:  # counted; the row is reported missing
                        reason = err.reason if isinstance(err, SampleError) else "undecodable"
                        bad[(reason, sample.shard)] = bad.get((reason, sample.shard), 0) + 1
                    if len(images) == self.micro:
                        yield _padded(job, images, ids, self.micro, bad)
                        images, ids, bad = [], [], {}
            if images or bad:
                yield _padded(job, images, ids, self.micro, bad)


def _padded(job: int, images: list, ids: list, micro: int, bad: dict) -> dict:
    n = len(images)
    if n == 0:
        return {"job": job, "images": None, "bad": dict(bad)}
    imgs = torch.stack(images + [torch.zeros_like(images[0])] * (micro - n))
    return {"job": job, "images": imgs, "ids": torch.tensor(ids + [-1] * (micro - n)),
            "valid": torch.arange(micro) < n, "bad": dict(bad)}


class SelectedImages:
    """The wanted rows of several *jobs* (a job: a shard set and ``{(shard, position): row id}``)
    as ``(job, batch)`` pairs: batches of ``micro`` uint8 images whose ``targets`` are row ids,
    from this rank's shards (shard ``i`` of a set on rank ``i % world``). Every rank yields the
    same number of pairs (padding pairs at the end have job -1 and no valid row), so every rank
    runs the same number of forwards. With ``workers`` > 0 the decode processes are started at
    the first iteration and kept for the next ones (the jobs do not change): one fork per run,
    never a fork right after another loader's shutdown, which can deadlock a process that runs
    collective-communication threads. After iterating, ``bad`` holds this rank's unusable
    samples by (reason, shard)."""

    def __init__(self, jobs: list[tuple[ShardSet, dict[tuple[int, int], int]]], rank: int, world: int, micro: int,
                 img_size: int, crop_pct: float = 1.0, workers: int = 0):
        self.world, self.micro, self.img_size = world, micro, img_size
        self.readers = max(1, min(workers, 8))
        self.workers = workers
        self.by_job: list[dict[int, dict[int, int]]] = []
        for _, wanted in jobs:
            by_shard: dict[int, dict[int, int]] = {}
            for (shard, pos), row in wanted.items():
                by_shard.setdefault(shard, {})[pos] = row
            self.by_job.append(by_shard)
        self.total = max(self._batches(r) for r in range(world))
        mine = [[(s.urls[i], by[i]) for i in sorted(by) if i % world == rank] for (s, _), by in
                zip(jobs, self.by_job, strict=True)]
        self.dataset = _Selected(mine, micro, img_size, crop_pct, self.readers)
        self._loader = None
        self.bad: dict = {}

    def _batches(self, rank: int) -> int:
        """Batches rank ``rank`` yields at most (each reader rounds each job up to whole batches)."""
        total = 0
        for by in self.by_job:
            mine = [i for i in sorted(by) if i % self.world == rank]
            total += sum(-(-sum(len(by[i]) for i in mine[w::self.readers]) // self.micro) for w in range(self.readers))
        return total

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        if self._loader is None:
            n = self.readers if self.workers else 0
            self._loader = DataLoader(self.dataset, batch_size=None, persistent_workers=n > 0, **worker_options(n))
        produced = 0
        self.bad = {}
        for b in self._loader:
            for key, n in b["bad"].items():
                self.bad[key] = self.bad.get(key, 0) + n
            if b["images"] is None or produced == self.total:
                continue
            produced += 1
            yield b["job"], Batch(b["images"], b["ids"], [], b["valid"])
        size = self.img_size
        while produced < self.total:
            produced += 1
            yield -1, Batch(torch.zeros(self.micro, 3, size, size, dtype=torch.uint8),
                            torch.full((self.micro,), -1, dtype=torch.long), [],
                            torch.zeros(self.micro, dtype=torch.bool))
