"""vitscale: pretrain Vision Transformers at scale with DeepSpeed ZeRO, convert and fine-tune them."""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, device: str = "cpu"):
    """The model stored at ``path`` in eval mode: a vitscale run directory, a checkpoint
    directory (any ZeRO stage, any world size), or a consolidated safetensors file; also any
    other format :func:`pretrain.formats.read_weights` reads (npz, timm, HF).

    Weights are fp32 on ``device``. Raises :class:`pretrain.core.errors.UserError` when the path holds
    no model or its dimensions cannot be known.
    """
    import torch

    from pretrain.core.errors import UserError
    from pretrain.formats import read_weights
    from pretrain.model.vit import build_model

    sd, spec, meta = read_weights(path)
    if spec is None:
        raise UserError(f"{path}: the number of attention heads cannot be read from this file; convert it "
                        f"with `vitscale convert {path} model.safetensors --to safetensors --heads N`")
    model = build_model(spec)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.to(device).eval()
