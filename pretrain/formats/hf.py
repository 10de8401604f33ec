"""HuggingFace transformers ViT directories (``config.json`` + ``model.safetensors``).

On-disk keys (what ``save_pretrained`` writes; ``vit.`` prefix in ``ViTForImageClassification``,
none in ``ViTModel``) and ours::

    embeddings.cls_token                                cls_token
    embeddings.position_embeddings                      pos_embed
    embeddings.patch_embeddings.projection.*            patch_embed.proj.*
    encoder.layer.{i}.layernorm_before.*                blocks.{i}.norm1.*
    encoder.layer.{i}.attention.attention.{query,key,value}.*   blocks.{i}.attn.qkv.* (rows q|k|v)
    encoder.layer.{i}.attention.output.dense.*          blocks.{i}.attn.proj.*
    encoder.layer.{i}.layernorm_after.*                 blocks.{i}.norm2.*
    encoder.layer.{i}.intermediate.dense.*              blocks.{i}.mlp.fc1.*
    encoder.layer.{i}.output.dense.*                    blocks.{i}.mlp.fc2.*
    layernorm.*                                         norm.*
    pooler.dense.*  (Linear + pooler_act tanh)          pre_logits.*
    classifier.*    (on the class token, top level)     head.*

transformers 5 names the modules ``layers.{i}.attention.{q,k,v,o}_proj`` / ``mlp.fc{1,2}`` in
memory; those names are read too.

HF's classifier reads the class token directly, so HF has no model with a classifier *after*
a pooler. Our models therefore map to:

- no pre-logits, classes > 0: ``ViTForImageClassification`` (our logits == HF logits)
- pre-logits: ``ViTModel`` with the pooler (``pooler_output_size`` R, ``pooler_act`` tanh), so HF's
  ``pooler_output`` == our ``forward_head(x, pre_logits=True)``; the head, which HF cannot hold,
  is written to ``vitscale_head.safetensors`` beside it (``head.weight``, ``head.bias``) and read
  back from there
- no pre-logits, no classes: ``ViTModel`` without pooler weights (load it with
  ``add_pooling_layer=False``; ``last_hidden_state`` == our ``forward_features``)

Global-average-pooled models have no HF ViT equivalent and are refused. ``layer_norm_eps`` is
the spec's ``norm_eps`` both ways (read with HF's default 1e-12 when config.json leaves it out,
as ``save_pretrained`` does for a default value; written as the spec has it, 1e-6 for our own
models), so HF -> vitscale -> HF keeps it and our logits equal transformers'. We write
``hidden_act`` "gelu" (exact) and our spec under ``"vitscale"`` in config.json (for reference;
everything it holds HF also names). Reading a model whose activation is not exact GELU or whose
pooler is not tanh warns: our ViT computes with GELU / tanh.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.core.errors import UserError
from pretrain.formats.ours import read_header
from pretrain.formats.state_dict import StateDict, first_keys, max_abs_diff, refuse_clip_parts, warn
from pretrain.formats.timm import hub_config, load_torch_state_dict
from pretrain.model.vit import VisionTransformer, ViTSpec

HEAD_FILE = "vitscale_head.safetensors"
HF_DEFAULT_EPS = 1e-12  # ViTConfig's layer_norm_eps, which save_pretrained leaves out of config.json

_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
        "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.weight", "pooler.dense.bias": "pre_logits.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
_LAYER_RE = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_dir(p: Path) -> bool:
    """A transformers model folder: weights beside a config.json that names a ``model_type``
    (timm's Hub folders have a config.json too, without one)."""
    if not (p.is_dir() and any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                                            "pytorch_model.bin"))):
        return False
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def is_hf(p: Path) -> bool:
    """A HF folder (:func:`is_hf_dir`), or its weights file beside its config.json: ``model*.safetensors``
    or ``pytorch_model.bin`` (not a timm Hub folder's). A lone ``.safetensors`` with HF key names is a
    :class:`UserError`: the config.json is needed."""
    if p.is_dir():
        return is_hf_dir(p)
    suffix = p.suffix.lower()
    beside = (p.parent / "config.json").is_file() and hub_config(p.parent) is None
    if suffix == ".safetensors":
        if p.name.startswith("model") and beside:
            return True
        if any(".encoder.layer." in k or k.startswith("encoder.layer.") for k in read_header(p)[1]):
            raise UserError(f"{p} holds HF transformers ViT weights; pass the directory with its config.json")
        return False
    return p.name == "pytorch_model.bin" and beside


def _load_hf_tensors(d: Path) -> StateDict:
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    if (d / "model.safetensors.index.json").is_file():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        sd: StateDict = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(d / shard)))
        return sd
    return load_torch_state_dict(d / "pytorch_model.bin")


def _side(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise UserError(f"non-square image/patch size {v} in config.json is not supported")
        return int(v[0])
    return int(v)


def from_hf(hf: StateDict, where: str, meta: dict) -> StateDict:
    """HF on-disk (or transformers 5 in-memory) keys -> ours; unknown keys are a :class:`UserError`."""
    sd: StateDict = {}
    qkv: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    unknown, dropped = [], []
    for key, t in hf.items():
        k = key.removeprefix("vit.")
        if k in _TOP:
            sd[_TOP[k]] = t
        elif m := _LAYER_RE.match(k):
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if mod in _QKV:
                qkv.setdefault(i, {})[(_QKV[mod], kind)] = t
            elif mod in _LAYER:
                sd[f"blocks.{i}.{_LAYER[mod]}.{kind}"] = t
            else:
                unknown.append(key)
        elif k == "embeddings.mask_token":
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{where} has tensors that are not part of a HF ViT: {first_keys(unknown)}")
    for i, parts in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            missing = [n for j, n in enumerate(("query", "key", "value")) if (j, kind) not in parts]
            if missing:
                raise UserError(f"{where} lacks encoder.layer.{i}.attention.attention.{missing[0]}.{kind}; "
                                f"the checkpoint is incomplete (qkv_bias=False models are not supported)")
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[(j, kind)] for j in range(3)])
    if "head.weight" in sd and "pre_logits.weight" in sd:
        dropped += ["pooler.dense.weight", "pooler.dense.bias"]
        del sd["pre_logits.weight"], sd["pre_logits.bias"]
        warn(meta, f"{where}: the classifier reads the class token, so the pooler is not part of the logits "
                   f"and was dropped")
    if dropped:
        meta["unmapped"] = dropped
    return sd


def read_hf(path: str | Path) -> tuple[StateDict, ViTSpec, dict]:
    """(our state dict, spec, meta) of a HF ViT directory (see the module docstring)."""
    d = Path(path)
    if d.is_file():
        d = d.parent
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{d / 'config.json'} is missing or not valid JSON: {err}") from err
    if cfg.get("model_type") != "vit":
        raise UserError(f"{d} holds a {cfg.get('model_type')!r} model; only HF 'vit' models convert")
    if int(cfg.get("num_channels", 3)) != 3:
        raise UserError(f"{d}: num_channels {cfg['num_channels']} in config.json; only RGB (3) is supported")
    meta: dict = {"hf_architectures": cfg.get("architectures")}
    sd = from_hf(_load_hf_tensors(d), str(d), meta)
    if (d / HEAD_FILE).is_file() and "head.weight" not in sd:
        sd.update(load_file(str(d / HEAD_FILE)))
    if cfg.get("hidden_act", "gelu") != "gelu":
        warn(meta, f"{d}: hidden_act is {cfg['hidden_act']!r}, vitscale's ViT uses exact GELU")
    if "pre_logits.weight" in sd and cfg.get("pooler_act", "tanh") != "tanh":
        warn(meta, f"{d}: pooler_act is {cfg['pooler_act']!r}, vitscale's pre-logits layer uses tanh")
    rep = int(sd["pre_logits.weight"].shape[0]) if "pre_logits.weight" in sd else None
    spec = ViTSpec(img_size=_side(cfg.get("image_size", 224)), patch_size=_side(cfg.get("patch_size", 16)),
                   width=int(cfg.get("hidden_size", 768)), depth=int(cfg.get("num_hidden_layers", 12)),
                   mlp_dim=int(cfg.get("intermediate_size", 3072)),
                   heads=int(cfg.get("num_attention_heads", 12)),
                   num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
                   representation_size=rep, norm_eps=float(cfg.get("layer_norm_eps", HF_DEFAULT_EPS)))
    return sd, spec, meta


def hf_architecture(spec: ViTSpec) -> str:
    """The transformers class that loads what :func:`write_hf` writes for ``spec``."""
    return "ViTForImageClassification" if spec.num_classes and not spec.representation_size else "ViTModel"


def hf_config(spec: ViTSpec, dtype: torch.dtype) -> dict:
    """config.json contents for ``spec`` (see the module docstring)."""
    if spec.pool != "cls":
        raise UserError("HF transformers' ViT always pools the class token; a global-average-pooled model "
                        "(pool 'gap') has no HF equivalent. Convert --to timm / npz / safetensors instead")
    refuse_clip_parts(spec, "HF transformers' ViT")
    arch = hf_architecture(spec)
    cfg = {
        "architectures": [arch], "model_type": "vit", "hidden_size": spec.width,
        "num_hidden_layers": spec.depth, "num_attention_heads": spec.heads, "intermediate_size": spec.mlp_dim,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": spec.norm_eps,
        "image_size": spec.img_size, "patch_size": spec.patch_size, "num_channels": 3, "qkv_bias": True,
        "encoder_stride": spec.patch_size, "pooler_output_size": spec.representation_size or spec.width,
        "pooler_act": "tanh", "dtype": str(dtype).removeprefix("torch."), "vitscale": spec.to_dict(),
    }
    if arch == "ViTForImageClassification":
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(spec.num_classes)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(spec.num_classes)}
    return cfg


def to_hf(sd: StateDict, spec: ViTSpec) -> tuple[StateDict, StateDict]:
    """(HF on-disk tensors, head tensors for :data:`HEAD_FILE` or {}) of our state dict."""
    arch = hf_architecture(spec)
    p = "vit." if arch == "ViTForImageClassification" else ""
    inverse = {v: k for k, v in _TOP.items()}
    hf: StateDict = {}
    head: StateDict = {}
    legacy = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for k, t in sd.items():
        if k.startswith("head.") and arch == "ViTModel":
            head[k] = t
        elif k.startswith("head."):
            hf[inverse[k]] = t
        elif k in inverse:
            hf[p + inverse[k]] = t
        elif m := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k):
            i, mod, kind = m.groups()
            base = f"{p}encoder.layer.{i}."
            if mod == "attn.qkv":
                for name, part in zip(("query", "key", "value"), t.chunk(3), strict=True):
                    hf[f"{base}attention.attention.{name}.{kind}"] = part.contiguous()
            else:
                hf[f"{base}{legacy[mod]}.{kind}"] = t
        else:
            raise UserError(f"the weights hold {k!r}, which has no place in a HF ViT")
    return hf, head


def write_hf(sd: StateDict, spec: ViTSpec, out_dir: str | Path, meta: dict | None = None) -> None:
    """Write config.json + model.safetensors (+ the head file) into ``out_dir`` (created); ``meta``
    (what a conversion read with the source) is not recorded."""
    out_dir = Path(out_dir)
    dtype = next(iter(sd.values())).dtype
    cfg = hf_config(spec, dtype)
    hf, head = to_hf(sd, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    if head:
        save_file(head, str(out_dir / HEAD_FILE), metadata={"format": "vitscale-head"})
    tmp = out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out_dir / "config.json")


def load_hf_model(path: str | Path):
    """The transformers model saved at ``path`` (fp32, eval), of the class its config names."""
    import transformers

    cfg = json.loads((Path(path) / "config.json").read_text())
    arch = (cfg.get("architectures") or ["ViTModel"])[0]
    if arch == "ViTForImageClassification":
        return transformers.ViTForImageClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    weights = Path(path) / "model.safetensors"
    pooler = "pooler.dense.weight" in read_header(weights)[1] if weights.is_file() else True
    model = transformers.ViTModel.from_pretrained(str(path), add_pooling_layer=pooler, dtype=torch.float32)
    return model.eval()


def hf_oracle(path: Path, spec: ViTSpec, ours: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    """transformers' own model loaded from the HF folder ``path``, against ``ours``."""
    import transformers

    hf = load_hf_model(path)
    name = f"transformers {transformers.__version__} {type(hf).__name__}"
    with torch.no_grad():
        out = hf(pixel_values=x)
        feats = ours.forward_features(x)
        if type(hf).__name__ == "ViTForImageClassification":
            return f"{name} logits", max_abs_diff(out.logits, ours.forward_head(feats))
        if spec.representation_size:
            return (f"{name} pooler_output (our pre-logits)",
                    max_abs_diff(out.pooler_output, ours.forward_head(feats, pre_logits=True)))
        return f"{name} last_hidden_state", max_abs_diff(out.last_hidden_state, feats)
