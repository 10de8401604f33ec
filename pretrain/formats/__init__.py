"""Weights formats, each read into (and written from) the state dict of :mod:`pretrain.model.vit`.

One module per format, and one entry per format in :data:`pretrain.formats.registry.REGISTRY`,
the table that detection (:func:`detect_format`), reading (:func:`read_weights`), writing and
verification (:mod:`pretrain.formats.convert`) and ``vitscale inspect`` go through:

=====================  =========================================  ================================
name                   what                                       module
=====================  =========================================  ================================
safetensors            ours: one file, spec in its metadata       :mod:`pretrain.formats.ours`
deepspeed              our ZeRO training checkpoint (run/tag)     :mod:`.deepspeed_ckpt`
deepspeed-universal    DeepSpeed universal checkpoint             :mod:`.deepspeed_ckpt`
npz                    Google vit_jax / big_vision .npz           :mod:`.npz`
openclip               OpenCLIP ViT image tower                   :mod:`.openclip`
hf                     HF transformers ViT directory              :mod:`.hf`
timm                   timm VisionTransformer state dict          :mod:`.timm`
=====================  =========================================  ================================
"""

from __future__ import annotations

from pretrain.formats.deepspeed_ckpt import consolidate_deepspeed, resolve_deepspeed_checkpoint
from pretrain.formats.ours import load_safetensors, save_safetensors
from pretrain.formats.registry import REGISTRY, detect_format, format_names, read_weights

__all__ = ["REGISTRY", "consolidate_deepspeed", "detect_format", "format_names", "load_safetensors",
           "read_weights", "resolve_deepspeed_checkpoint", "save_safetensors"]
