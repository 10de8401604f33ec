"""Classification losses and metrics on logits; targets are class indices or multi-hot rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss in fp32. ``kind="softmax"``: cross-entropy on class indices (B,), or on (B, C)
    probability rows (Mixup / CutMix targets, already smoothed); ``kind="sigmoid"``: sigmoid
    cross-entropy on multi-hot or mixed (B, C) targets in [0, 1] (class indices are turned into
    one-hot rows), summed over classes as in the ViT/JFT setup, averaged over images."""
    logits = logits.float()
    if kind == "softmax":
        if targets.dim() == 2:
            return F.cross_entropy(logits, targets.float())
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if targets.dim() == 1:
        targets = F.one_hot(targets, logits.shape[-1])
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


@torch.no_grad()
def correct_counts(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed hits of the batch: ``top1``/``top5`` for class indices; for multi-hot targets
    ``prec1`` (the top-scoring class is one of the image's labels)."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k)
    if targets.dim() == 1:
        hit = top == targets[:, None]
        return {"top1": hit[:, 0].sum(), "top5": hit.any(dim=-1).sum()}
    return {"prec1": targets.gather(1, top[:, :1]).clamp(max=1).sum()}
