"""A model from any weights file or checkpoint vitscale reads (the public ``pretrain.load_model``)."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.core.errors import UserError
from pretrain.formats import read_weights
from pretrain.model.vit import VisionTransformer, build_model


def load_model(path: str | Path, device: str = "cpu", ema: bool = False) -> VisionTransformer:
    """The model stored at ``path`` in eval mode, fp32 on ``device``: a vitscale run directory, a
    checkpoint directory (any ZeRO stage, any world size), a consolidated safetensors file, or any
    other format :func:`pretrain.formats.read_weights` reads (npz, timm, timm Hub folder, HF).
    ``ema``: a training checkpoint's EMA weights. :class:`UserError` when the path holds no model
    (or no EMA) or its dimensions cannot be known."""
    sd, spec, _ = read_weights(path, ema=ema)
    if spec is None:
        raise UserError(f"{path}: the number of attention heads cannot be read from this file; convert it "
                        f"with `vitscale convert {path} model.safetensors --to safetensors --heads N`")
    model = build_model(spec)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.to(device).eval()
