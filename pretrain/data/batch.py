"""The unit every input pipeline hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S): uint8 pixels (shards; normalised on the device) or float, normalised
    targets: torch.Tensor  # (B,) class indices or (B, C) multi-hot
    keys: list[str] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B,) bool; eval padding rows are False
