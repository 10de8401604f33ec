"""OpenCLIP image towers (``open_clip``'s ``VisionTransformer``), as OpenCLIP users have them.

Read: a CLIP model's state dict (``torch.save(model.state_dict())`` as ``.pt`` / ``.pth`` / ``.bin``,
open_clip's training checkpoints ``{"state_dict": {"module.visual...": ...}}``, or ``.safetensors``),
of which ``visual.*`` is the image tower (the text tower, ``logit_scale`` etc. are ignored and
counted in ``meta["ignored_keys"]``); the image tower's own state dict (the same keys without
``visual.``); or an OpenCLIP Hub folder (``open_clip_config.json`` beside
``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``), whose config is also read when
a weights file is given from such a folder. Keys and ours::

    conv1.weight (no bias)                     patch_embed.proj.weight        (patch_bias False)
    class_embedding (D,)                       cls_token (1, 1, D)
    positional_embedding (1 + N, D)            pos_embed (1, 1 + N, D)
    ln_pre.*                                   norm_pre.*                     (pre_norm True)
    transformer.resblocks.{i}.ln_1 / attn.in_proj_{weight,bias} (rows q|k|v) / attn.out_proj /
        ln_2 / mlp.c_fc / mlp.c_proj           blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 /
                                               mlp.fc1 / mlp.fc2
    ln_post.*                                  norm.*
    proj (D, E)                                proj.weight (E, D), its transpose  (proj_dim E)

so our ``model(x)`` (no head) is open_clip's ``model.encode_image(x)``: the class token after
``ln_post``, projected (unnormalised). What a state dict does not record: the activation (QuickGELU
in OpenAI's weights, open_clip's ``*-quickgelu`` models; GELU, open_clip's default, otherwise),
read from the Hub config's ``quick_gelu`` or our ``model_spec`` metadata, else GELU with a warning;
the LayerNorm epsilon (1e-5, open_clip's, unless the config's ``vision_cfg.norm_kwargs`` says); the
head count (``--heads``, the config's ``width / head_width``, the known-variant table by width,
else width / 64, open_clip's default head width, with a warning). Refused with the keys named:
attentional pooling, layer scale, custom blocks (q/k norm, scaled attention), ResNet or timm image
towers, and a config whose ``pool_type`` is not ``tok``.

Fine-tuning from it: the projection is part of the backbone (``proj_dim``), so the new zero head
reads the CLIP image embedding; ``model.proj_dim=null`` drops the projection instead (the head then
reads the normed class token, as timm's fine-tuned CLIP models do).

Written: the image tower under ``visual.`` as ``.safetensors`` (open_clip's own loader reads it; our
``model_spec`` in the metadata keeps the activation, epsilon and heads; torch files cannot record
them, so they are not written), for models open_clip's ``VisionTransformer`` computes: class token,
no patch bias, a projection, no pre-logits or head (``--drop-head`` drops a head).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.core.errors import UserError
from pretrain.formats.ours import read_header
from pretrain.formats.state_dict import (
    StateDict,
    first_keys,
    heads_for_width,
    infer_spec,
    max_abs_diff,
    spec_from_dict,
    warn,
)
from pretrain.formats.timm import WEIGHT_SUFFIXES, load_torch_state_dict
from pretrain.model.vit import VisionTransformer, ViTSpec

CONFIG = "open_clip_config.json"
_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OPENCLIP_EPS = 1e-5
_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
        "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")
_NOT_OURS = {"attn_pool": "attentional pooling", ".ls_1.": "layer scale", ".ls_2.": "layer scale",
             "ln_attn": "custom blocks", "ln_inner": "custom blocks", "q_norm": "q/k norm", "k_norm": "q/k norm",
             "head_scale": "custom blocks", "logit_scale": "scaled cosine attention", "trunk.": "a timm image tower",
             "attnpool.": "a ResNet image tower", "layer1.": "a ResNet image tower"}


def _weights(p: Path) -> Path:
    return next((p / f for f in _HUB_WEIGHTS if (p / f).is_file()), p) if p.is_dir() else p


def _keys(p: Path) -> list[str]:
    if p.suffix.lower() == ".safetensors":
        return list(read_header(p)[1])
    try:
        return list(load_torch_state_dict(p))
    except UserError:
        return []


def is_openclip(p: Path) -> bool:
    """An OpenCLIP Hub folder, or a weights file whose keys are a CLIP model's (``visual.*``) or an
    OpenCLIP image tower's (``conv1.weight`` + ``class_embedding``)."""
    if p.is_dir():
        return (p / CONFIG).is_file() and _weights(p) != p
    if not (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES):
        return False
    keys = set(_keys(p))
    return any(k.startswith("visual.") for k in keys) or {"conv1.weight", "class_embedding"} <= keys


def _config(p: Path) -> dict:
    folder = p if p.is_dir() else p.parent
    try:
        return json.loads((folder / CONFIG).read_text()).get("model_cfg") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}


def from_openclip(tower: StateDict, where: str) -> StateDict:
    """An OpenCLIP image tower's keys (without ``visual.``) -> ours; :class:`UserError` for parts we lack."""
    foreign = sorted(k for k in tower if any(m in k for m in _NOT_OURS))
    if foreign:
        what = sorted({d for k in foreign for m, d in _NOT_OURS.items() if m in k})
        raise UserError(f"{where} is an OpenCLIP image tower with {', '.join(what)} ({first_keys(foreign)}), which "
                        f"vitscale's ViT does not compute; only plain ViT towers convert")
    sd: StateDict = {}
    unknown = []
    for k, t in tower.items():
        if k in _TOP:
            sd[_TOP[k]] = t
        elif k == "class_embedding":
            sd["cls_token"] = t.reshape(1, 1, -1)
        elif k == "positional_embedding":
            sd["pos_embed"] = t.reshape(1, -1, t.shape[-1])
        elif k == "proj":
            sd["proj.weight"] = t.T.contiguous()
        elif (m := _BLOCK_RE.match(k)) and m.group(2) in _BLOCK:
            sd[f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(k)
    if unknown or "conv1.weight" not in tower:
        raise UserError(f"{where}: {first_keys(unknown) if unknown else 'no conv1.weight'} has no place in "
                        f"vitscale's ViT; it is not an OpenCLIP ViT image tower")
    return sd


def read_openclip(path: Path, heads: int | None = None) -> tuple[StateDict, ViTSpec, dict]:
    """(our state dict, spec, meta) of an OpenCLIP weights file or Hub folder (module docstring)."""
    weights, cfg, meta = _weights(Path(path)), _config(Path(path)), {}
    vision = cfg.get("vision_cfg") or {}
    if vision.get("pool_type", "tok") != "tok" or vision.get("attentional_pool") or "timm_model_name" in vision:
        raise UserError(f"{path}: the image tower pools with {vision.get('pool_type', 'attention')!r} or is not a "
                        f"ViT ({CONFIG}); vitscale's ViT computes open_clip's class-token ('tok') pooling only")
    raw = load_file(str(weights)) if weights.suffix.lower() == ".safetensors" else load_torch_state_dict(weights)
    visual = any(k.startswith("visual.") for k in raw)
    tower = {k.removeprefix("visual."): v for k, v in raw.items() if k.startswith("visual.") or not visual}
    meta["ignored_keys"] = len(raw) - len(tower)
    sd = from_openclip(tower, str(weights))
    file_meta = read_header(weights)[0] if weights.suffix.lower() == ".safetensors" else {}
    if "model_spec" in file_meta:
        return sd, spec_from_dict(json.loads(file_meta["model_spec"]), str(weights)), meta
    width = int(sd["patch_embed.proj.weight"].shape[0])
    if "head_width" in vision or "width" in vision:
        heads = heads or width // int(vision.get("head_width", 64))
    heads = heads or heads_for_width(width)
    if heads is None:
        heads = max(1, width // 64)
        warn(meta, f"{weights}: the head count is not recorded; read as width / 64 = {heads} (open_clip's default "
                   f"head width): pass --heads N if the model was built with another")
    if "quick_gelu" not in cfg:
        warn(meta, f"{weights}: an OpenCLIP state dict does not record its activation; read as GELU (open_clip's "
                   f"default). OpenAI's weights (open_clip's *-quickgelu models, pretrained='openai') use QuickGELU: "
                   f"put their {CONFIG} beside the file (as on the Hub) or set model.act=quick_gelu")
    eps = float((vision.get("norm_kwargs") or {}).get("eps", _OPENCLIP_EPS))
    spec = replace(infer_spec(sd, heads, str(weights)), act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
                   norm_eps=eps)
    return sd, spec, meta


def to_openclip(sd: StateDict, spec: ViTSpec) -> StateDict:
    """Our state dict -> an OpenCLIP image tower under ``visual.``; :class:`UserError` for what
    open_clip's ``VisionTransformer`` does not compute."""
    lacks = [why for bad, why in ((spec.pool != "cls", "a class token"), (spec.patch_bias, "no patch bias"),
                                  (not spec.proj_dim, "a projection (proj_dim)"),
                                  (bool(spec.representation_size), "no pre-logits layer"),
                                  (spec.num_classes > 0, "no classifier head (pass --drop-head)")) if bad]
    if lacks:
        raise UserError(f"open_clip's VisionTransformer needs {', '.join(lacks)}; this model cannot be written as an "
                        f"OpenCLIP image tower. Convert --to safetensors instead")
    inverse = {v: k for k, v in _TOP.items()}
    out: StateDict = {}
    for k, t in sd.items():
        if k in inverse:
            out[inverse[k]] = t
        elif k == "cls_token":
            out["class_embedding"] = t.reshape(-1)
        elif k == "pos_embed":
            out["positional_embedding"] = t.reshape(-1, t.shape[-1])
        elif k == "proj.weight":
            out["proj"] = t.T
        else:
            i, mod, kind = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k).groups()
            theirs = {v: n for n, v in _BLOCK.items()}[mod]
            sep = "_" if theirs == "attn.in_proj" else "."
            out[f"transformer.resblocks.{i}.{theirs}{sep}{kind}"] = t
    return {f"visual.{k}": v.contiguous() for k, v in out.items()}


def write_openclip(sd: StateDict, spec: ViTSpec, path: Path, meta: dict | None = None) -> None:
    """Write the image tower as ``.safetensors`` (see the module docstring)."""
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: OpenCLIP towers are written as .safetensors (open_clip loads them; a torch file "
                        f"cannot record the activation, LayerNorm epsilon and head count)")
    out = to_openclip(sd, spec)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(out, str(tmp), metadata={"format": "pt", "model_spec": json.dumps(spec.to_dict())})
    os.replace(tmp, path)


def openclip_oracle(path: Path, spec: ViTSpec, ours: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    """open_clip's own model against ``ours``: a Hub folder through ``create_model('local-dir:...')``
    (``encode_image``), a file through its ``VisionTransformer`` for ``spec`` filled from open_clip's
    own ``load_state_dict``."""
    import open_clip
    from open_clip.factory import load_state_dict
    from open_clip.transformer import LayerNorm, QuickGELU
    from open_clip.transformer import VisionTransformer as OpenClipViT

    if path.is_dir():
        model = open_clip.create_model(f"local-dir:{path}").eval()
        name, run = f"open_clip {open_clip.__version__} create_model('local-dir:') encode_image", model.encode_image
    else:
        run = OpenClipViT(spec.img_size, spec.patch_size, spec.width, spec.depth, spec.heads, spec.mlp_dim / spec.width,
                          output_dim=spec.proj_dim, act_layer=QuickGELU if spec.act == "quick_gelu" else torch.nn.GELU,
                          norm_layer=partial(LayerNorm, eps=spec.norm_eps), no_ln_pre=not spec.pre_norm).eval()
        tower = load_state_dict(str(path))
        run.load_state_dict({k.removeprefix("visual."): v for k, v in tower.items()
                             if k.startswith("visual.") or not any(n.startswith("visual.") for n in tower)})
        name = f"open_clip {open_clip.__version__} VisionTransformer image features"
    with torch.no_grad():
        return name, max_abs_diff(run(x), ours(x))
