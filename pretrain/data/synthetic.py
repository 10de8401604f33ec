"""A learnable, deterministic image-classification task that needs no files.

All classes share one palette of ``base x base`` random colours (fixed by the seed); a class is
one arrangement (permutation) of that palette over a ``base x base`` grid. A sample is its class
layout, upsampled bilinearly to the image size, shifted by a small random translation and mixed
with noise. Every image holds the same colours, so only *where* they are tells the classes apart:
a ViT must use its position embeddings, and the same picture at a higher resolution is the same
task (the fine-tune tests and demo rely on both). Sample ``i`` is a pure function of
``(seed, i)``; labels cycle through the classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
