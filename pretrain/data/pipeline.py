"""Input pipelines behind one small interface, with resumable state.

A train source yields :class:`Batch` objects, one micro batch per call of ``next_batch()``, and
its ``state_dict()`` (epoch, position) goes into every checkpoint so a resumed run continues
with exactly the next samples. Data order is a pure function of (seed, epoch, position).
``build_train_data`` picks the source from ``data.train``: ``synthetic`` (see
:mod:`pretrain.data.synthetic`) or WebDataset shards (:mod:`pretrain.data.loader`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pretrain.data.synthetic import synthetic_images
from pretrain.train.config import Config


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) float, normalised
    targets: torch.Tensor  # (B,) class indices or (B, C) multi-hot
    keys: list[str] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B,) bool; eval padding rows are False


def _synthetic_classes(cfg: Config) -> int:
    return cfg.data.synthetic_classes or cfg.model.num_classes


class SyntheticTrain:
    """Endless synthetic stream; global micro batch ``b`` holds samples
    ``[b*W*M, (b+1)*W*M)`` and rank ``r`` takes its ``r``-th slice of ``M``."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.micro = cfg.train.micro_batch
        self.position = 0  # global samples consumed (all ranks)

    def next_batch(self) -> Batch:
        start = self.position + self.rank * self.micro
        idx = list(range(start, start + self.micro))
        self.position += self.world * self.micro
        images, labels = synthetic_images(idx, _synthetic_classes(self.cfg), self.cfg.model.img_size,
                                          self.cfg.run.seed)
        return Batch(images, labels, [f"syn{i:09d}" for i in idx])

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": 0, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def stats(self) -> dict:
        return {}

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def synthetic_eval(cfg: Config, rank: int, world: int) -> Iterator[Batch]:
    """The held-out synthetic set (indices from 10^9 on, never seen in training), split over
    ranks with the same number of batches each; padding rows have ``valid=False``."""
    n, micro = cfg.data.val_samples, cfg.train.micro_batch
    per_rank = -(-n // world)
    batches = -(-per_rank // micro)
    if cfg.train.eval_batches:
        batches = min(batches, cfg.train.eval_batches)
    base = 1_000_000_000
    for b in range(batches):
        idx = [rank * per_rank + b * micro + j for j in range(micro)]
        valid = torch.tensor([i < n and (i - rank * per_rank) < per_rank for i in idx])
        images, labels = synthetic_images([base + i for i in idx], _synthetic_classes(cfg),
                                          cfg.model.img_size, cfg.run.seed)
        yield Batch(images, labels, [], valid)


def build_train_data(cfg: Config, rank: int, world: int):
    if cfg.data.train == "synthetic":
        return SyntheticTrain(cfg, rank, world)
    from pretrain.data.loader import ShardTrain

    return ShardTrain(cfg, rank, world)


def build_eval_data(cfg: Config, rank: int, world: int) -> Iterator[Batch] | None:
    if not cfg.data.val:
        return None
    if cfg.data.val == "synthetic":
        return synthetic_eval(cfg, rank, world)
    from pretrain.data.loader import shard_eval

    return shard_eval(cfg, rank, world)
