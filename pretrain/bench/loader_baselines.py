"""What ``vitscale bench loader`` sets our training loader against: the baselines, and the
decode + augmentation cost alone.

Our path is not here: the benchmark times :class:`pretrain.data.loader.ShardTrain` itself. These
are the comparisons, each an endless DataLoader dataset over the same shards:

* :class:`PilBatches`: the plain path a torch user writes first: Pillow's full decode, crop,
  resize, flip (:func:`pretrain.data.transforms.baseline_transform`) and ``default_collate``;
  worker ``w`` of ``W`` reads every W-th shard (every W-th sample when there are fewer shards);
* :func:`webdataset_batches`: WebDataset's standard pipeline, ``WebDataset(urls).decode("pil")``
  and the same Inception crop + flip on the decoded image, batched by WebDataset;
* :class:`TransformOnly`: :func:`pretrain.data.transforms.train_transform` alone (and RandAugment
  when asked) on the same images with the same crops (each sample's generator is
  ``seeded("aug", seed, epoch, key)``, the training loader's rule, epoch after epoch) from bytes
  already in memory, reporting the thread CPU of those calls only. The benchmark subtracts it
  from the training loader's CPU per image: what remains is everything else the loader does.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from pretrain.data.shards import SampleError, decode_label, image_bytes, iter_tar_samples
from pretrain.data.stream import seeded
from pretrain.data.transforms import baseline_transform, pil_random_resized_crop, rand_augment, train_transform

RANDAUG = (2, 15)  # big_vision's AugReg setting for L/16 on ImageNet-21k
TRANSFORM_SAMPLES = 4096  # images TransformOnly keeps in memory (all of them in a small set)
_LABEL_LIMIT = 1 << 62


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _label(files: dict[str, bytes]) -> int:
    try:
        return int(decode_label(files, _LABEL_LIMIT, False))
    except SampleError:
        return -1


class PilBatches(IterableDataset):
    """Endless ``(images, labels)`` batches of the plain Pillow path (see the module docstring)."""

    def __init__(self, files: list[str], img_size: int, batch_size: int, seed: int = 0) -> None:
        self.files, self.img_size, self.batch_size, self.seed = files, img_size, batch_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        torch.set_num_threads(1)
        by_shard = len(self.files) >= workers
        files = self.files[worker::workers] if by_shard else self.files
        images, labels = [], []
        for index, sample in enumerate(s for path in itertools.cycle(files) for s in iter_tar_samples(path)):
            if not by_shard and index % workers != worker:
                continue
            try:
                data = image_bytes(sample)
            except SampleError:
                continue
            images.append(baseline_transform(data, self.img_size, seeded("aug", self.seed, worker, index)))
            labels.append(_label(sample.files))
            if len(images) == self.batch_size:
                yield default_collate(images), torch.tensor(labels)
                images, labels = [], []


class _WdsCrop:
    """The map step of the WebDataset pipeline: the crop + flip of a decoded Pillow image."""

    def __init__(self, img_size: int, seed: int) -> None:
        self.img_size, self.seed, self.rng = img_size, seed, None

    def __call__(self, sample: tuple) -> tuple[torch.Tensor, int]:
        if self.rng is None:
            torch.set_num_threads(1)
            self.rng = random.Random(self.seed * 1009 + _worker()[0])
        img, label = sample
        return pil_random_resized_crop(img, self.img_size, self.rng), int(label)


def webdataset_batches(files: list[str], img_size: int, batch_size: int, workers: int,
                       seed: int = 0) -> IterableDataset:
    """WebDataset's standard pipeline over ``files``, endless: split by worker when there are at
    least as many shards as workers (else every worker reads all shards), batched by WebDataset."""
    import webdataset as wds

    splitter = wds.split_by_worker if len(files) >= max(1, workers) else None
    return (wds.WebDataset(files, shardshuffle=False, workersplitter=splitter, empty_check=False)
            .decode("pil").to_tuple("jpg;jpeg;png;webp", "cls").map(_WdsCrop(img_size, seed))
            .batched(batch_size, partial=False).repeat())


class TransformOnly(IterableDataset):
    """Endless ``{"rows": n, "transform_cpu": seconds}`` batches: ``train_transform`` (+ RandAugment
    with ``randaug = (layers, magnitude)``, layers > 0) of worker ``w``'s share (every W-th) of the
    first :data:`TRANSFORM_SAMPLES` samples of ``files``, read into memory first, into a reused
    channels-last batch buffer as the loader's rows are; epoch ``e`` draws each sample's crop
    from ``seeded("aug", seed, e, key)``. ``transform_cpu`` is the thread CPU of those calls."""

    def __init__(self, files: list[str], img_size: int, batch_size: int, seed: int = 0,
                 crop_scale_min: float = 0.05, hflip: bool = True, randaug: tuple[int, float] = (0, 0)) -> None:
        self.files, self.img_size, self.batch_size, self.seed = files, img_size, batch_size, seed
        self.crop = {"scale": (crop_scale_min, 1.0), "hflip": 0.5 if hflip else 0.0}
        self.randaug = randaug

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        torch.set_num_threads(1)
        samples = []
        for index, sample in enumerate(itertools.islice(
                (s for path in self.files for s in iter_tar_samples(path)), TRANSFORM_SAMPLES)):
            if index % workers == worker and sample.image() is not None:
                samples.append((sample.key, image_bytes(sample)))
        if not samples:
            raise RuntimeError(f"worker {worker} of {workers} has no image among the first samples of {self.files}")
        size, (layers, magnitude) = self.img_size, self.randaug
        rows = torch.empty(self.batch_size, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
        n, cpu = 0, 0.0
        for epoch in itertools.count():
            for key, data in samples:
                rng = seeded("aug", self.seed, epoch, key)
                start = time.thread_time()
                try:
                    img = train_transform(data, size, rng, **self.crop, out=rows[n])
                    if layers > 0:
                        img.copy_(rand_augment(img, layers, magnitude, rng.getrandbits(63)))
                except Exception:  # the loader skips what it cannot decode; so does this
                    continue
                cpu += time.thread_time() - start
                n += 1
                if n == self.batch_size:
                    yield {"rows": n, "transform_cpu": cpu}
                    n, cpu = 0, 0.0
