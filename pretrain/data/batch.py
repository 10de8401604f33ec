"""The unit every input pipeline hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    # (B, 3, S, S): uint8 pixels (shards; normalised on the device, channels-last memory from the
    # CPU train loader, on the device already with data.decode=gpu) or float, normalised
    images: torch.Tensor
    targets: torch.Tensor  # (B,) class indices or (B, C) multi-hot
    keys: list[str] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B,) bool; eval padding rows are False
