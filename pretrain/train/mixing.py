"""Mixup and CutMix on the device, per micro batch, as timm's ``Mixup`` does in batch mode.

For a micro batch: with probability ``augment.mix_prob`` it is mixed with itself reversed
(sample i with sample B-1-i). CutMix (when ``cutmix_alpha`` > 0, and with probability
``switch_prob`` when Mixup is on too) pastes a box of the reversed batch whose area is
1 - lam of the image for lam ~ Beta(alpha, alpha) (box clipped to the image, lam corrected to
the pasted area); Mixup blends the whole images with weight lam. Targets become dense rows mixed
with the same lam: for the softmax loss one-hot rows (label smoothing applied before mixing, so
the two compose) that sum to 1; for the sigmoid / multi-label loss multi-hot rows, which stay in
[0, 1]. Every draw comes from a generator seeded by (seed, step, canonical micro batch): the same
step after a resume, also on another world size, mixes exactly as before, independently of timing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.core.seeds import derive_seed
from pretrain.data.config import AugmentConfig


def dense_targets(targets: torch.Tensor, num_classes: int, loss: str, smoothing: float) -> torch.Tensor:
    """(B,) class indices or (B, C) multi-hot -> (B, C) float rows; label smoothing spreads
    ``smoothing`` evenly over the classes (timm's rule: 1 - s + s/C on the label, s/C elsewhere)."""
    rows = F.one_hot(targets, num_classes).float() if targets.dim() == 1 else targets.float()
    if smoothing:
        rows = rows * (1.0 - smoothing) + smoothing / num_classes
    return rows


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box with area about (1 - lam) x the image, centred at a
    uniformly drawn point and clipped to the image (timm's ``rand_bbox``)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    return (max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width))


@dataclass(frozen=True)
class Mixer:
    """``mixer(images, targets, step, micro)`` -> (mixed images, dense target rows); ``micro`` is
    the micro batch's place in the global batch (rank x accumulation steps + its index)."""

    aug: AugmentConfig
    num_classes: int
    loss: str
    smoothing: float
    seed: int

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int,
                 micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = dense_targets(targets, self.num_classes, self.loss, self.smoothing if self.loss == "softmax" else 0.0)
        rng = random.Random(derive_seed("mix", self.seed, step, micro))
        if rng.random() >= self.aug.mix_prob:
            return images, rows
        a = self.aug
        cutmix = a.cutmix_alpha > 0 and (a.mixup_alpha == 0 or rng.random() < a.switch_prob)
        alpha = a.cutmix_alpha if cutmix else a.mixup_alpha
        lam = rng.betavariate(alpha, alpha)
        other = images.flip(0)
        if cutmix:
            top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
            images = images.clone()
            images[..., top:bottom, left:right] = other[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        else:
            images = images.lerp(other, 1.0 - lam)
        return images, rows.lerp(rows.flip(0), 1.0 - lam)


def build_mixer(aug: AugmentConfig, num_classes: int, loss: str, smoothing: float, seed: int) -> Mixer | None:
    """The run's mixer, or None when Mixup and CutMix are off (the batch is then never touched)."""
    return Mixer(aug, num_classes, loss, smoothing, seed) if aug.mixing else None
