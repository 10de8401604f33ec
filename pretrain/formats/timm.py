"""timm ``VisionTransformer`` state dicts (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``).

timm's keys are ours, one for one, for the plain ViT timm builds with
``VisionTransformer(img_size, patch_size, embed_dim=D, depth, num_heads, mlp_ratio=M/D,
qkv_bias=True, class_token=..., global_pool="token" | "avg", fc_norm=False, num_classes=C)``::

    cls_token, pos_embed (class slot included), patch_embed.proj.*, blocks.{i}.norm1 /
    attn.qkv (fused q|k|v) / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm.*, head.*

Our gap-pooled models are timm's ``class_token=False, global_pool="avg", fc_norm=False`` (LayerNorm
on the tokens, then the mean).

Reading also accepts: checkpoints wrapped as ``{"state_dict"|"model"|"module": ...}`` and
``module.``-prefixed keys; old timm's (<0.6) pre-logits ``pre_logits.fc.{weight,bias}``;
``no_embed_class`` models (pos-embed without a class slot while a class token exists: read with
a zero class row). Refused with a message naming the keys: anything timm adds that our ViT
does not compute (``fc_norm``, register tokens, layer scale ``ls1/ls2``, ``attn_pool``,
``norm_pre``, q/k norms).

A timm Hub folder (what ``timm``'s ``push_to_hf_hub`` / ``save_for_hf`` write, the layout of every
``timm/...`` repository: ``config.json`` with ``architecture``, ``num_classes``, ``global_pool``,
``pretrained_cfg`` and usually ``model_args``, but no HF ``model_type``, beside
``model.safetensors`` or ``pytorch_model.bin``) is read from its weights file, with the head count
from ``model_args.num_heads`` when given.

LayerNorm epsilon: timm builds its ViTs with 1e-6 and a state dict does not record it, so a timm
file reads as ``norm_eps`` 1e-6 (ours with ``model_spec`` metadata: as recorded there). A model
with another epsilon (HF's 1e-12) written for timm computes slightly differently in timm, which
``vitscale convert`` warns about and ``--verify`` measures.

Writing: current timm ViTs have no pre-logits layer, so a model with ``pre_logits`` is refused
(:class:`UserError`); ``vitscale convert --drop-head`` writes its backbone instead. A
``.safetensors`` output carries ``model_spec`` in its metadata (heads are then exact on reading
back); ``.pth`` / ``.pt`` / ``.bin`` are ``torch.save`` of the plain dict, and reading them takes
the head count from ``--heads`` or the known-variant table.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.core.errors import UserError
from pretrain.formats.ours import read_header
from pretrain.formats.state_dict import (
    StateDict,
    first_keys,
    infer_spec,
    max_abs_diff,
    refuse_clip_parts,
    spec_from_dict,
)
from pretrain.model.vit import VisionTransformer, ViTSpec

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

_NOT_OURS = {
    "fc_norm.": "a LayerNorm after pooling (fc_norm)",
    "reg_token": "register tokens",
    ".ls1.": "layer scale",
    ".ls2.": "layer scale",
    "attn_pool.": "attention pooling (map)",
    "norm_pre.": "a pre-norm before the blocks",
    ".q_norm.": "q/k normalisation",
    ".k_norm.": "q/k normalisation",
}


def load_torch_state_dict(path: Path) -> StateDict:
    """A flat tensor dict from a torch checkpoint file, unwrapped from common containers."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise UserError(f"{path} is not a readable torch checkpoint ({err}); pass a .pth/.bin state "
                        f"dict") from err
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a flat dict of tensors (a state dict)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_tensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    """(tensors, safetensors metadata or {}) of a .safetensors or torch file."""
    if path.suffix == ".safetensors":
        meta, _ = read_header(path)
        return load_file(str(path)), meta
    return load_torch_state_dict(path), {}


def from_timm(sd: StateDict, where: str) -> StateDict:
    """timm keys -> ours (refusing parts our ViT lacks)."""
    def marks(k: str) -> list[str]:
        return [d for p, d in _NOT_OURS.items() if (p in k if p.startswith(".") else k.startswith(p))]

    foreign = sorted(k for k in sd if marks(k))
    if foreign:
        what = sorted({d for k in foreign for d in marks(k)})
        raise UserError(f"{where} is a timm model with {', '.join(what)} ({first_keys(foreign)}), which "
                        f"vitscale's ViT does not compute; only plain ViTs convert")
    out = {}
    for k, v in sd.items():
        if k.startswith("pre_logits.fc."):
            k = "pre_logits." + k[len("pre_logits.fc."):]
        out[k] = v
    if "cls_token" in out and "pos_embed" in out:
        n = int(out["pos_embed"].shape[1])
        if math.isqrt(n) ** 2 == n:
            out["pos_embed"] = torch.cat([torch.zeros_like(out["pos_embed"][:, :1]), out["pos_embed"]], dim=1)
    return out


_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def hub_config(folder: Path) -> dict | None:
    """timm's config.json of a Hub folder, or None when ``folder`` is not one."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or "architecture" not in cfg or "model_type" in cfg:
        return None
    return cfg


def is_timm_hub_dir(p: Path) -> bool:
    return p.is_dir() and hub_config(p) is not None and any((p / f).is_file() for f in _HUB_WEIGHTS)


def timm_weights(path: str | Path) -> tuple[Path, dict | None]:
    """(weights file, timm's Hub config.json or None) of a timm state-dict file or Hub folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    hub = hub_config(folder) if path.is_dir() or path.name in _HUB_WEIGHTS else None
    if hub is not None and path.is_dir():
        path = next((folder / f for f in _HUB_WEIGHTS if (folder / f).is_file()), path)
    return path, hub


def read_timm(path: str | Path, heads: int | None = None) -> tuple[StateDict, ViTSpec | None, dict]:
    """(our state dict, spec, meta) of a timm ViT state-dict file or timm Hub folder.

    The spec comes from the file's ``model_spec`` metadata when we wrote it, else from shapes
    (heads: ``heads``, a Hub folder's ``model_args.num_heads``, or the known-variant table; None
    when none of them knows).
    """
    meta: dict = {}
    path, hub = timm_weights(path)
    if hub is not None:
        meta["timm_architecture"] = hub["architecture"]
        heads = heads or (hub.get("model_args") or {}).get("num_heads")
    raw, file_meta = load_tensors(path)
    sd = from_timm(raw, str(path))
    if "model_spec" in file_meta:
        spec = spec_from_dict(json.loads(file_meta["model_spec"]), str(path))
    else:
        spec = infer_spec(sd, heads=heads, where=str(path))
    return sd, spec, meta


def is_timm(p: Path) -> bool:
    """A timm Hub folder, or any weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``): in the
    registry's order timm comes last, so this claims the files no other format did."""
    if p.is_dir():
        return is_timm_hub_dir(p)
    return p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES


def to_timm(sd: StateDict, spec: ViTSpec) -> StateDict:
    """Our state dict -> timm's (the same keys); :class:`UserError` for a pre-logits model."""
    refuse_clip_parts(spec, "timm's plain VisionTransformer")
    if spec.representation_size:
        raise UserError("timm's VisionTransformer has no pre-logits layer, so this model "
                        f"(representation_size {spec.representation_size}) cannot be written for timm as it "
                        "is. Pass --drop-head to write the backbone alone (pre_logits and head dropped, as "
                        "fine-tuning does), or convert --to hf / npz / safetensors, which keep it")
    return dict(sd)


def timm_kwargs(spec: ViTSpec) -> dict:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` for ``spec``."""
    return dict(img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.width, depth=spec.depth,
                num_heads=spec.heads, mlp_ratio=spec.mlp_dim / spec.width, qkv_bias=True,
                class_token=spec.pool == "cls", global_pool="token" if spec.pool == "cls" else "avg",
                fc_norm=False, num_classes=spec.num_classes)


def write_timm(sd: StateDict, spec: ViTSpec, path: str | Path, meta: dict | None = None) -> None:
    """Write a timm state dict: safetensors (with ``model_spec`` metadata) or ``torch.save``
    (``meta``, what a conversion read with the source, is not recorded)."""
    path = Path(path)
    out = {k: v.contiguous() for k, v in to_timm(sd, spec).items()}
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        save_file(out, str(tmp), metadata={"format": "pt", "model_spec": json.dumps(spec.to_dict())})
    else:
        torch.save(out, tmp)
    os.replace(tmp, path)


def timm_oracle(path: Path, spec: ViTSpec, ours: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    """timm's own model (``timm.create_model`` of a Hub folder's architecture, else its
    ``VisionTransformer`` for ``spec``) filled by timm's own loader, against ``ours``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights, hub = timm_weights(path)
    if hub is not None:
        kwargs = {"num_classes": hub.get("num_classes"), "global_pool": hub.get("global_pool"),
                  **(hub.get("model_args") or {})}
        model = timm.create_model(hub["architecture"], pretrained=False,
                                  **{k: v for k, v in kwargs.items() if v is not None})
        name = f"timm {timm.__version__} create_model({hub['architecture']!r})"
    else:
        model = TimmViT(**timm_kwargs(spec))
        name = f"timm {timm.__version__} VisionTransformer"
    timm.models.load_checkpoint(model, str(weights), filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        return f"{name} logits", max_abs_diff(model.eval()(x), ours(x))


def timm_cannot_hold(spec: ViTSpec) -> str | None:
    """Why timm's VisionTransformer cannot be the oracle for ``spec`` (None: it can)."""
    return "timm's VisionTransformer has no pre-logits layer" if spec.representation_size else None
