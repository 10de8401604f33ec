"""A learnable, deterministic image-classification task that needs no files.

Each class owns a random low-resolution colour layout (a ``base x base`` grid, fixed by the
seed); a sample is its class layout, upsampled bilinearly to the image size, shifted by a small
random translation and mixed with noise. Where things are matters, so a ViT must use its position
embeddings, and the same picture at a higher resolution is the same task (fine-tune tests rely
on that). Sample ``i`` is a pure function of ``(seed, i)``; labels cycle through the classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_BASE = 4


def class_templates(num_classes: int, seed: int) -> torch.Tensor:
    """(classes, 3, base, base) colour layouts in [-1, 1], one per class."""
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    return torch.rand(num_classes, 3, _BASE, _BASE, generator=g) * 2 - 1


def synthetic_label(index: int, num_classes: int) -> int:
    return index % num_classes


def synthetic_images(indices: list[int], num_classes: int, img_size: int, seed: int,
                     noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (B, 3, S, S) in about [-1, 1] (already normalised) and int64 labels (B,)."""
    templates = class_templates(num_classes, seed)
    labels = torch.tensor([synthetic_label(i, num_classes) for i in indices], dtype=torch.long)
    pad = img_size // 8
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
