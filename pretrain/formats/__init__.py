"""Checkpoint formats, each read into (and written from) the state dict of :mod:`pretrain.model.vit`.

One module per format; :func:`read_weights` detects a path's format and returns our state dict.
The writers and the verification live in :mod:`pretrain.commands.convert`.

=====================  =========================================  ================================
name                   what                                       module
=====================  =========================================  ================================
safetensors            ours: one file, spec in its metadata       :mod:`pretrain.formats.ours`
deepspeed              our ZeRO training checkpoint (run/tag)     :mod:`.deepspeed_ckpt`
deepspeed-universal    DeepSpeed universal checkpoint             :mod:`.deepspeed_ckpt`
npz                    Google vit_jax / big_vision .npz           :mod:`.npz`
timm                   timm VisionTransformer state dict          :mod:`.timm`
hf                     HF transformers ViT directory              :mod:`.hf`
=====================  =========================================  ================================
"""

from __future__ import annotations

from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.formats.deepspeed_ckpt import (
    consolidate_deepspeed,
    consolidate_ema,
    read_universal,
    resolve_deepspeed_checkpoint,
)
from pretrain.formats.detect import FORMATS, detect_format
from pretrain.formats.hf import read_hf
from pretrain.formats.npz import read_npz
from pretrain.formats.ours import load_safetensors, save_safetensors
from pretrain.formats.state_dict import StateDict, check_state_dict, dtype_names, infer_spec
from pretrain.formats.timm import read_timm
from pretrain.model.vit import ViTSpec

__all__ = ["FORMATS", "consolidate_deepspeed", "detect_format", "load_safetensors", "read_weights",
           "resolve_deepspeed_checkpoint", "save_safetensors"]


def _read_deepspeed(path: Path, heads: int | None) -> tuple[StateDict, ViTSpec | None, dict]:
    sd, spec, meta = consolidate_deepspeed(path)
    return sd, spec or infer_spec(sd, heads, str(path)), meta


def _read_deepspeed_ema(path: Path, heads: int | None) -> tuple[StateDict, ViTSpec | None, dict]:
    sd, spec, meta = consolidate_ema(path)
    return sd, spec or infer_spec(sd, heads, str(path)), meta


def _read_universal(path: Path, heads: int | None) -> tuple[StateDict, ViTSpec | None, dict]:
    sd, spec, meta = read_universal(path)
    return sd, spec or infer_spec(sd, heads, str(path)), meta


_READERS = {
    "safetensors": lambda p, heads: load_safetensors(p),
    "deepspeed": _read_deepspeed,
    "deepspeed-universal": _read_universal,
    "npz": read_npz,
    "timm": read_timm,
    "hf": lambda p, heads: read_hf(p),
}


def read_weights(path: str | Path, fmt: str | None = None, *, heads: int | None = None,
                 ema: bool = False) -> tuple[StateDict, ViTSpec | None, dict]:
    """(state dict in our keys, spec, meta) of any supported checkpoint, on CPU.

    ``fmt``: one of :data:`FORMATS`, detected when None. ``heads`` fills in the head count for
    formats that do not store it (timm ``.pth``); without it the known-variant table by width is
    used, and the spec is None only when neither knows. Tensors keep their stored dtype (fp32
    master weights for DeepSpeed). ``meta`` always has ``format``, ``source`` and ``dtype``, and
    may have ``step``, ``world_size``, ``zero_stage``, ``config``, ``warnings`` (also raised as
    Python warnings) and ``unmapped`` (source keys dropped on purpose, e.g. HF ``mask_token``).
    When the spec is known the state dict has been checked against it. ``ema``: the EMA weights of
    a vitscale training checkpoint instead of its trained weights (only format ``deepspeed``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if ema and fmt != "deepspeed":
        raise UserError(f"{path} is {fmt!r}: EMA weights are read from a vitscale training checkpoint (a run or "
                        f"checkpoint directory); a converted file holds one set of weights")
    reader = _read_deepspeed_ema if ema else _READERS[fmt]
    sd, spec, meta = reader(path, heads)
    if spec is not None:
        check_state_dict(sd, spec, str(path))
    meta = {**meta, "format": fmt, "source": str(path), "dtype": ", ".join(dtype_names(sd))}
    return sd, spec, meta
