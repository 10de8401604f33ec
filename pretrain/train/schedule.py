"""Learning-rate schedules as pure functions of the step (resume needs no scheduler state)."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, decay: str,
          min_lr: float = 0.0) -> float:
    """LR for optimizer step ``step`` (1-based): linear warmup from 0 to ``base_lr`` over
    ``warmup_steps``, then ``decay`` ("linear", "cosine" or "constant") down to ``min_lr`` at
    ``total_steps``."""
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if decay == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - frac)
    if decay == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown decay {decay!r}: use linear, cosine or constant")
