"""Google ``.npz`` checkpoints: vit_jax (read and write) and big_vision (read).

Keys are Flax parameter paths joined with ``/``; kernels are Flax ``Dense``/``Conv`` layouts.
D width, H heads, hd = D / H head dim, M MLP dim, p patch, N grid tokens, C classes, R pre-logits.

vit_jax (google-research/vision_transformer; also ``opt/target/`` prefixed in old optimizer
checkpoints)::

    embedding/kernel (p, p, 3, D) HWIO          embedding/bias (D,)
    cls (1, 1, D)                               only with the class token ("token" classifier)
    Transformer/posembed_input/pos_embedding (1, 1 + N, D)   includes the class slot
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
        .../MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, hd), bias (H, hd)
        .../MultiHeadDotProductAttention_1/out/kernel (H, hd, D), bias (D,)
        .../LayerNorm_2/{scale,bias}
        .../MlpBlock_3/Dense_0/kernel (D, M), bias (M,);  Dense_1/kernel (M, D), bias (D,)
    Transformer/encoder_norm/{scale,bias}
    pre_logits/kernel (D, R), bias (R,)         optional
    head/kernel (R or D, C), bias (C,)          optional

big_vision (google-research/big_vision ``models/vit.py``), prefix ``params/`` (classifier
checkpoints) or ``params/img/`` (image tower of two-tower models)::

    embedding/kernel, embedding/bias            as vit_jax
    pos_embedding (1, N, D)                     grid only: added to the patches *before* the class
                                                token is prepended, so the class token gets none;
                                                read as our pos_embed with a zero class row
    cls (1, 1, D)                               only with pool_type "tok"; "gap" has none
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
        MlpBlock_0/Dense_{0,1}                  same shapes as vit_jax
    Transformer/encoderblock/...                scanned (scan=True): every array above with a
                                                leading depth axis, e.g. LayerNorm_0/scale (depth, D)
    Transformer/encoder_norm, pre_logits, head  as vit_jax (pre_logits optional)

Arrays saved from bfloat16 come back from numpy as 2-byte void (``V2``) or ``uint16``; both
are read as bfloat16 bit patterns. Not supported (a :class:`UserError` says so): "map" pooling
(``MAPHead_0``), computed sincos2d position embeddings (no ``pos_embedding`` stored), hybrid
ResNet stems (``conv_root``). Keys outside the chosen prefix (optimizer state, a text tower)
are ignored and counted in ``meta["ignored_keys"]``; unknown keys inside it are an error.

We write the vit_jax layout (float32, no prefix); a model without class token is written as
vit_jax's "gap" classifier (no ``cls``, pos-embedding without a class slot).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from pretrain.core.errors import UserError
from pretrain.formats.state_dict import StateDict, first_keys, infer_spec, refuse_clip_parts
from pretrain.model.vit import ViTSpec

_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if (a.dtype.kind == "V" and a.dtype.itemsize == 2) or a.dtype == np.uint16 or a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def _open(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable .npz file: {err}") from err


def _pick_prefix(keys: set[str], path: Path) -> str:
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in keys:
            return prefix
    if any(k.endswith("conv_root/kernel") for k in keys):
        raise UserError(f"{path} is a hybrid (ResNet stem) ViT, which vitscale does not support")
    found = sorted(k for k in keys if k.endswith("embedding/kernel"))
    hint = f" (found {first_keys(found)})" if found else ""
    raise UserError(f"{path} has no ViT patch embedding under any known prefix "
                    f"({', '.join(repr(p + 'embedding/kernel') for p in _PREFIXES)}){hint}; it is not a "
                    f"vit_jax or big_vision ViT checkpoint")


class _Reader:
    """Reads arrays under one prefix, remembering which keys were used. A scanned (depth-stacked)
    array is read from the file once and dropped after its last layer (``index == last``)."""

    def __init__(self, npz, prefix: str, path: Path):
        self.npz, self.prefix, self.path = npz, prefix, path
        self.keys = {k[len(prefix):] for k in npz.files if k.startswith(prefix)}
        self.used: set[str] = set()
        self.last = -1
        self._stacked: dict[str, np.ndarray] = {}

    def has(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        if key not in self.keys:
            raise UserError(f"{self.path} lacks {self.prefix + key!r}; the checkpoint is incomplete or not a "
                            f"plain ViT")
        self.used.add(key)
        if index is None:
            return _to_torch(self.npz[self.prefix + key])
        if key not in self._stacked:
            self._stacked[key] = self.npz[self.prefix + key]
        a = self._stacked[key][index]
        if index == self.last:
            del self._stacked[key]
        return _to_torch(a)


def _block_names(r: _Reader, base: str) -> tuple[str, str, str]:
    """(attention, second LayerNorm, MLP) module names: vit_jax numbers them 1, 2, 3, big_vision 0, 1, 0."""
    if r.has(f"{base}MultiHeadDotProductAttention_1/query/kernel"):
        return "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    return "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"


def _read_block(r: _Reader, base: str, idx: int | None, out: StateDict, i: int) -> int:
    attn, ln2, mlp = _block_names(r, base)
    o = f"blocks.{i}."
    out[o + "norm1.weight"] = r.get(f"{base}LayerNorm_0/scale", idx)
    out[o + "norm1.bias"] = r.get(f"{base}LayerNorm_0/bias", idx)
    qkv_w, qkv_b = [], []
    for name in ("query", "key", "value"):
        k = r.get(f"{base}{attn}/{name}/kernel", idx)  # (D, H, hd)
        heads = k.shape[1]
        qkv_w.append(k.reshape(k.shape[0], -1).T)
        qkv_b.append(r.get(f"{base}{attn}/{name}/bias", idx).reshape(-1))
    out[o + "attn.qkv.weight"] = torch.cat(qkv_w).contiguous()
    out[o + "attn.qkv.bias"] = torch.cat(qkv_b)
    k = r.get(f"{base}{attn}/out/kernel", idx)  # (H, hd, D)
    out[o + "attn.proj.weight"] = k.reshape(-1, k.shape[-1]).T.contiguous()
    out[o + "attn.proj.bias"] = r.get(f"{base}{attn}/out/bias", idx)
    out[o + "norm2.weight"] = r.get(f"{base}{ln2}/scale", idx)
    out[o + "norm2.bias"] = r.get(f"{base}{ln2}/bias", idx)
    for j, fc in ((0, "fc1"), (1, "fc2")):
        out[o + f"mlp.{fc}.weight"] = r.get(f"{base}{mlp}/Dense_{j}/kernel", idx).T.contiguous()
        out[o + f"mlp.{fc}.bias"] = r.get(f"{base}{mlp}/Dense_{j}/bias", idx)
    return heads


def read_npz(path: str | Path, heads: int | None = None) -> tuple[StateDict, ViTSpec | None, dict]:
    """(our state dict, inferred spec, meta) of a vit_jax or big_vision ``.npz`` (layouts above).

    ``meta``: ``layout`` ("vit_jax" or "big_vision"), ``prefix``, ``scanned``, ``ignored_keys``.
    The head count comes from the attention kernels; ``heads`` is only a cross-check.
    """
    path = Path(path)
    npz = _open(path)
    with npz:
        prefix = _pick_prefix(set(npz.files), path)
        r = _Reader(npz, prefix, path)
        if r.has("MAPHead_0/probe"):
            raise UserError(f"{path} uses multihead-attention pooling (MAPHead_0), which vitscale's ViT "
                            f"does not have; only class-token and global-average pooling convert")
        sd: StateDict = {}
        sd["patch_embed.proj.weight"] = r.get("embedding/kernel").permute(3, 2, 0, 1).contiguous()
        sd["patch_embed.proj.bias"] = r.get("embedding/bias")
        has_cls = r.has("cls")
        if has_cls:
            sd["cls_token"] = r.get("cls").reshape(1, 1, -1)
        if r.has("Transformer/posembed_input/pos_embedding"):
            layout, pos = "vit_jax", r.get("Transformer/posembed_input/pos_embedding")
        elif r.has("pos_embedding"):
            layout, pos = "big_vision", r.get("pos_embedding")
            if has_cls:
                pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        else:
            raise UserError(f"{path} stores no position embedding ({prefix}pos_embedding or "
                            f"{prefix}Transformer/posembed_input/pos_embedding); models with computed "
                            f"sincos2d position embeddings are not supported")
        sd["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])
        scanned = r.has("Transformer/encoderblock/LayerNorm_0/scale")
        if scanned:
            depth = int(npz[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
            r.last = depth - 1
            found_heads = [_read_block(r, "Transformer/encoderblock/", i, sd, i) for i in range(depth)]
        else:
            found = (re.match(r"Transformer/encoderblock_(\d+)/", k) for k in r.keys)
            idx = sorted({int(m.group(1)) for m in found if m})
            if idx != list(range(len(idx))) or not idx:
                raise UserError(f"{path}: encoder blocks under {prefix}Transformer/ are {idx or 'missing'}; "
                                f"expected encoderblock_0 .. encoderblock_(depth-1)")
            found_heads = [_read_block(r, f"Transformer/encoderblock_{i}/", None, sd, i) for i in idx]
        sd["norm.weight"] = r.get("Transformer/encoder_norm/scale")
        sd["norm.bias"] = r.get("Transformer/encoder_norm/bias")
        if r.has("pre_logits/kernel"):
            sd["pre_logits.weight"] = r.get("pre_logits/kernel").T.contiguous()
            sd["pre_logits.bias"] = r.get("pre_logits/bias")
        if r.has("head/kernel") and npz[prefix + "head/kernel"].shape[-1] > 0:
            sd["head.weight"] = r.get("head/kernel").T.contiguous()
            sd["head.bias"] = r.get("head/bias")
        else:
            r.used.update({"head/kernel", "head/bias"} & r.keys)
        unused = sorted(r.keys - r.used)
        ignored = sum(1 for k in npz.files if not k.startswith(prefix))
    if unused:
        raise UserError(f"{path} has parameters vitscale's ViT has no place for: "
                        f"{first_keys(prefix + k for k in unused)}; it is not a plain ViT")
    if heads is not None and heads != found_heads[0]:
        raise UserError(f"{path} has {found_heads[0]} attention heads (from its query kernels), not "
                        f"--heads {heads}")
    spec = infer_spec(sd, heads=found_heads[0], where=str(path))
    meta = {"layout": layout, "prefix": prefix, "scanned": scanned, "ignored_keys": ignored}
    return sd, spec, meta


def is_npz(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".npz"


def to_vit_jax(sd: StateDict, spec: ViTSpec) -> dict[str, np.ndarray]:
    """Our state dict -> vit_jax arrays (float32), keys as in the module docstring."""
    refuse_clip_parts(spec, "vit_jax's ViT")
    D, H = spec.width, spec.heads
    hd = D // H

    def n(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    out = {"embedding/kernel": n(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
           "embedding/bias": n(sd["patch_embed.proj.bias"]),
           "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
           "Transformer/encoder_norm/scale": n(sd["norm.weight"]),
           "Transformer/encoder_norm/bias": n(sd["norm.bias"])}
    if "cls_token" in sd:
        out["cls"] = n(sd["cls_token"])
    for i in range(spec.depth):
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = b + "MultiHeadDotProductAttention_1/"
        out[b + "LayerNorm_0/scale"] = n(sd[o + "norm1.weight"])
        out[b + "LayerNorm_0/bias"] = n(sd[o + "norm1.bias"])
        for w, bias, name in zip(sd[o + "attn.qkv.weight"].chunk(3), sd[o + "attn.qkv.bias"].chunk(3),
                                 ("query", "key", "value"), strict=True):
            out[a + f"{name}/kernel"] = n(w.T.reshape(D, H, hd))
            out[a + f"{name}/bias"] = n(bias.reshape(H, hd))
        out[a + "out/kernel"] = n(sd[o + "attn.proj.weight"].T.reshape(H, hd, D))
        out[a + "out/bias"] = n(sd[o + "attn.proj.bias"])
        out[b + "LayerNorm_2/scale"] = n(sd[o + "norm2.weight"])
        out[b + "LayerNorm_2/bias"] = n(sd[o + "norm2.bias"])
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[b + f"MlpBlock_3/Dense_{j}/kernel"] = n(sd[o + f"mlp.{fc}.weight"].T)
            out[b + f"MlpBlock_3/Dense_{j}/bias"] = n(sd[o + f"mlp.{fc}.bias"])
    for ours, theirs in (("pre_logits", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{theirs}/kernel"] = n(sd[f"{ours}.weight"].T)
            out[f"{theirs}/bias"] = n(sd[f"{ours}.bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_vit_jax_npz(sd: StateDict, spec: ViTSpec, path: str | Path, meta: dict | None = None) -> None:
    """Write ``sd`` as a vit_jax ``.npz`` at ``path`` (atomically; the name is kept as given).
    ``meta`` (what a conversion read with the source) is not recorded."""
    path = Path(path)
    arrays = to_vit_jax(sd, spec)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
