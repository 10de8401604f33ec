"""vitscale: pretrain Vision Transformers at scale with DeepSpeed ZeRO, convert and fine-tune them."""

from __future__ import annotations

__all__ = ["__version__", "load_model"]


def load_model(path, device: str = "cpu", ema: bool = False):
    """The model stored at ``path`` in eval mode: a vitscale run directory, a checkpoint
    directory (any ZeRO stage, any world size), or a consolidated safetensors file; also any
    other format :func:`pretrain.formats.read_weights` reads (npz, timm, HF); ``ema``: a
    training checkpoint's EMA weights (``ema.decay`` runs).

    Weights are fp32 on ``device``. Raises :class:`pretrain.core.errors.UserError` when the path holds
    no model or its dimensions cannot be known.
    """
    from pretrain.formats.load import load_model as load

    return load(path, device, ema)


def __getattr__(name: str):
    if name == "__version__":  # read from the package metadata on first use (pretrain.core.version)
        from pretrain.core.version import package_version

        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
