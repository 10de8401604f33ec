"""The input paths ``vitscale bench loader`` times, as DataLoader datasets over the same shards.

* ``ours``: the training loader's per-sample work: tar reading, label decoding, a per-sample
  seeded generator, :func:`pretrain.data.transforms.train_transform` (simplejpeg with DCT
  scaling, or the Pillow fallback);
* ``pil``: the same, with :func:`pretrain.data.transforms.baseline_transform` (Pillow's full
  decode, crop, resize: the plain path);
* ``webdataset``: WebDataset's standard pipeline, ``WebDataset(urls).decode("pil")`` and the same
  Inception crop + flip on the decoded image (:func:`pil_random_resized_crop`);
* ``randaug``: ``ours`` followed by RandAugment (``augment.randaug_layers`` /
  ``randaug_magnitude``, default the AugReg L/16 i21k setting 2, 15), as the training loader
  applies it to the batch row;
* ``overhead``: ``ours`` without the decode and augmentation (a fixed image per sample): what
  tar parsing, labels, seeding, collation and the hand-over cost on their own;
* ``gpu``: the workers' part of ``data.decode=gpu`` (header, box, packed bytes); the main
  process decodes each batch on the device (:func:`pretrain.data.device_decode.decode_packed`).

:class:`MixedBatches` runs them side by side: each worker makes one batch of every path in
turn, so load changes on a shared machine hit all paths alike, and reports the CPU time of its
reading/decoding thread (``time.thread_time``) and the wall time each batch took.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from pretrain.data.device_decode import pack, plan_train
from pretrain.data.handover import SharedBatches, SlotRef
from pretrain.data.shards import SampleError, decode_label, image_bytes, iter_tar_samples
from pretrain.data.stream import seeded
from pretrain.data.transforms import baseline_transform, pil_random_resized_crop, rand_augment, train_transform

CPU_PATHS = ("ours", "pil", "webdataset")
RANDAUG = (2, 15)  # big_vision's AugReg setting for L/16 on ImageNet-21k
PREFETCH = 2
HANDOVER_SLOTS = PREFETCH + 2
_LABEL_LIMIT = 1 << 62


def _label(files: dict[str, bytes]) -> int:
    try:
        return int(decode_label(files, _LABEL_LIMIT, False))
    except SampleError:
        return -1


class ShardImages(IterableDataset):
    """Endless batches ``(images, labels, worker id, worker CPU seconds)`` from tar shards for
    path ``path`` (``ours``, ``randaug``, ``pil``, ``overhead`` or ``gpu``; ``gpu`` batches are packed JPEGs).

    Worker ``w`` of ``W`` reads every W-th shard, or every W-th sample when there are fewer
    shards than workers; the augmentation generator of a sample is ``seeded("aug", seed, 0, w, i)``
    for its place ``i`` in the worker's stream, as the training loader seeds it. ``ours`` and
    ``overhead`` hand batches over as the training loader does (rows of the caller's
    :class:`SharedBatches`, a :class:`~pretrain.data.handover.SlotRef` per batch), ``pil`` as a
    plain DataLoader pipeline does (``default_collate``: a new shared tensor per batch)."""

    def __init__(self, files: list[str], path: str, img_size: int, batch_size: int = 64, seed: int = 0,
                 buffers: SharedBatches | None = None, randaug: tuple[int, int] = RANDAUG) -> None:
        self.files, self.path, self.img_size, self.batch_size, self.seed = files, path, img_size, batch_size, seed
        self.buffers = buffers  # ours / randaug / overhead: the rank process's batch buffers
        self.randaug = randaug  # (layers, magnitude) of the randaug path

    def samples(self) -> Iterator[tuple[bytes, int, random.Random]]:
        """This worker's endless ``(encoded image, label, augmentation generator)`` stream."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        by_shard = len(self.files) >= workers
        files = self.files[worker::workers] if by_shard else self.files
        position = index = 0
        while True:
            for path in files:
                for sample in iter_tar_samples(Path(path)):
                    position += 1
                    if not by_shard and (position - 1) % workers != worker:
                        continue
                    try:
                        data = image_bytes(sample)
                    except SampleError:
                        continue
                    yield data, _label(sample.files), seeded("aug", self.seed, 0, worker, index)
                    index += 1

    def __iter__(self) -> Iterator[tuple]:
        """Endless ``(images, labels, worker id, worker CPU seconds)`` batches."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        size, path, buffers = self.img_size, self.path, self.buffers
        images, labels = [], []
        for data, label, rng in self.samples():
            if path in ("ours", "randaug"):  # as the training loader: resized straight into the batch row
                img = train_transform(data, size, rng, out=buffers.current(worker)[len(images)])
                if path == "randaug":
                    img.copy_(rand_augment(img, *self.randaug, rng.getrandbits(63)))
                images.append(img)
            elif path == "overhead":
                images.append(buffers.current(worker)[len(images)])
            else:
                images.append((plan_train if path == "gpu" else baseline_transform)(data, size, rng))
            labels.append(label)
            if len(images) == self.batch_size:
                if path in ("ours", "randaug", "overhead"):  # as the training loader hands batches over
                    yield buffers.hand_over(worker, len(images)), np.array(labels), worker, time.process_time()
                else:
                    batch = pack(images, size) if path == "gpu" else default_collate(images)
                    yield batch, torch.tensor(labels), worker, time.process_time()
                images, labels = [], []


class _WdsCrop:
    """The map step of the WebDataset pipeline: the crop + flip of a decoded Pillow image."""

    def __init__(self, img_size: int, seed: int) -> None:
        self.img_size, self.seed, self.rng = img_size, seed, None

    def __call__(self, sample: tuple) -> tuple[torch.Tensor, int, int, float]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if self.rng is None:
            torch.set_num_threads(1)
            self.rng = random.Random(self.seed * 1009 + worker)
        img, label = sample
        return pil_random_resized_crop(img, self.img_size, self.rng), int(label), worker, time.process_time()


def webdataset_batches(files: list[str], img_size: int, batch_size: int, workers: int,
                       seed: int = 0) -> IterableDataset:
    """WebDataset's standard pipeline over ``files``, endless: split by worker when there are at
    least as many shards as workers (else every worker reads all shards), batched by WebDataset."""
    import webdataset as wds

    splitter = wds.split_by_worker if len(files) >= max(1, workers) else None
    return (wds.WebDataset(files, shardshuffle=False, workersplitter=splitter, empty_check=False)
            .decode("pil").to_tuple("jpg;jpeg;png;webp", "cls").map(_WdsCrop(img_size, seed))
            .batched(batch_size, partial=False).repeat())


class MixedBatches(IterableDataset):
    """Endless batches of all ``paths`` in turn, from every worker: dicts with ``path``, ``images``
    (a tensor, a :class:`~pretrain.data.handover.SlotRef` or packed JPEGs), ``rows``, ``worker``,
    and ``cpu`` / ``wall``: the seconds of worker-thread CPU and of wall clock the batch took.
    Each path reads the shards on its own (the same samples in the same order)."""

    def __init__(self, files: list[str], paths: list[str], img_size: int, batch_size: int, workers: int,
                 seed: int = 0, buffers: SharedBatches | None = None, randaug: tuple[int, int] = RANDAUG) -> None:
        self.files, self.paths, self.img_size, self.batch_size, self.workers, self.seed, self.buffers = \
            files, paths, img_size, batch_size, workers, seed, buffers
        self.randaug = randaug

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        streams = {path: iter(webdataset_batches(self.files, self.img_size, self.batch_size, self.workers, self.seed)
                              if path == "webdataset" else
                              ShardImages(self.files, path, self.img_size, self.batch_size, self.seed, self.buffers,
                                          self.randaug))
                   for path in self.paths}
        while True:
            for path, stream in streams.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                images = next(stream)[0]
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                rows = images.rows if isinstance(images, SlotRef) else (
                    images["boxes"].shape[0] if isinstance(images, dict) else images.shape[0])
                yield {"path": path, "images": images, "rows": rows, "worker": worker, "cpu": cpu, "wall": wall}
