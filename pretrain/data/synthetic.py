"""A learnable, deterministic image-classification task that needs no files.

All classes share one palette of ``base x base`` random colours (fixed by the seed); a class is
one arrangement (permutation) of that palette over a ``base x base`` grid. A sample is its class
layout, upsampled bilinearly to the image size, shifted by a small random translation and mixed
with noise. Every image holds the same colours, so only *where* they are tells the classes apart:
a ViT must use its position embeddings, and the same picture at a higher resolution is the same
task (the fine-tune tests and demo rely on both). Sample ``i`` is a pure function of
``(seed, i)``; labels cycle through the classes.

:class:`SyntheticTrain` and :class:`SyntheticEval` serve it through the loader interface
(``data.train=synthetic``, ``data.val=synthetic``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data.batch import Batch
from pretrain.data.config import LoaderSpec

_BASE = 4


def class_templates(num_classes: int, seed: int) -> torch.Tensor:
    """(classes, 3, base, base) colour layouts in [-1, 1]: one palette, one permutation per class."""
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    palette = torch.rand(_BASE * _BASE, 3, generator=g) * 2 - 1  # (cells, 3)
    perms = torch.stack([torch.randperm(_BASE * _BASE, generator=g) for _ in range(num_classes)])
    return palette[perms].permute(0, 2, 1).reshape(num_classes, 3, _BASE, _BASE)


def synthetic_label(index: int, num_classes: int) -> int:
    return index % num_classes


def synthetic_images(indices: list[int], num_classes: int, img_size: int, seed: int,
                     noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (B, 3, S, S) in about [-1, 1] (already normalised) and int64 labels (B,)."""
    templates = class_templates(num_classes, seed)
    labels = torch.tensor([synthetic_label(i, num_classes) for i in indices], dtype=torch.long)
    pad = max(1, img_size // 16)
    up = F.interpolate(templates[labels], size=img_size + 2 * pad, mode="bilinear", align_corners=False)
    out = torch.empty(len(indices), 3, img_size, img_size)
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
        img = up[row, :, dy:dy + img_size, dx:dx + img_size]
        out[row] = img + noise * torch.randn(3, img_size, img_size, generator=g)
    return out.clamp_(-1, 1), labels


def synthetic_uint8(index: int, num_classes: int, img_size: int, seed: int) -> np.ndarray:
    """Sample ``index`` as an (S, S, 3) uint8 picture, for writing real image files/shards."""
    img, _ = synthetic_images([index], num_classes, img_size, seed)
    return ((img[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


class SyntheticTrain:
    """Endless synthetic training stream with the loader interface; global micro batch ``b``
    holds samples ``[b*W*M, (b+1)*W*M)`` and rank ``r`` takes its ``r``-th slice of ``M``."""

    placement = "replicated"  # the global position, the same on every rank and world size

    def __init__(self, spec: LoaderSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.position = 0  # global samples consumed (all ranks)

    def next_batch(self) -> Batch:
        micro = self.spec.micro_batch
        start = self.position + self.rank * micro
        idx = list(range(start, start + micro))
        self.position += self.world * micro
        images, labels = synthetic_images(idx, synthetic_classes(self.spec), self.spec.img_size, self.spec.seed)
        return Batch(images, labels, [f"syn{i:09d}" for i in idx])

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": 0, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint of a shard run (data.train changed since): continue at its global sample count
        self.position = int(state.get("position", state.get("global_samples", 0)))

    def stats(self) -> dict:
        return {}

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass


class SyntheticEval:
    """The held-out synthetic set (indices from 10^9 on, never seen in training), split over
    ranks with the same number of batches each; padding rows have ``valid=False``."""

    def __init__(self, spec: LoaderSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.expected = None if spec.eval_batches else spec.data.val_samples
        self.bad: dict = {}

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        n, micro = spec.data.val_samples, spec.micro_batch
        per_rank = -(-n // self.world)
        batches = -(-per_rank // micro)
        if spec.eval_batches:
            batches = min(batches, spec.eval_batches)
        base = 1_000_000_000
        for b in range(batches):
            idx = [self.rank * per_rank + b * micro + j for j in range(micro)]
            valid = torch.tensor([i < n and (i - self.rank * per_rank) < per_rank for i in idx])
            images, labels = synthetic_images([base + i for i in idx], synthetic_classes(spec), spec.img_size,
                                              spec.seed)
            yield Batch(images, labels, [], valid)


def synthetic_classes(spec: LoaderSpec) -> int:
    return spec.data.synthetic_classes or spec.num_classes
