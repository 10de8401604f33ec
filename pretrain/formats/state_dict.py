"""What every format adapter shares: our key layout, spec inference from shapes, checks.

Every reader returns a state dict in the key layout of :mod:`pretrain.model.vit`; this module checks
such a dict against a :class:`~pretrain.model.vit.ViTSpec` (naming every missing, unexpected or
mis-shaped key) and infers the spec from the tensors when a format does not store it:

- width: ``patch_embed.proj.weight.shape[0]``; patch size: its kernel; depth: number of blocks;
  MLP dim: ``blocks.0.mlp.fc1.weight.shape[0]``
- pool: ``cls`` when ``cls_token`` exists, else ``gap``; image size: ``sqrt(grid tokens) * patch``
  where grid tokens = pos-embed tokens minus the class slot
- representation size: ``pre_logits.weight.shape[0]``; classes: ``head.weight.shape[0]`` (0 if absent)
- CLIP-tower parts: ``pre_norm`` when ``norm_pre.weight`` exists, ``patch_bias`` when
  ``patch_embed.proj.bias`` does, ``proj_dim``: ``proj.weight.shape[0]`` (None if absent); the
  activation and the LayerNorm epsilon are not in the tensors (the reader sets them)
- heads: given by the caller (a file that stores them, or ``--heads``), else the known-variant
  table by width (192->3, 384->6, 768->12, 1024/1280/1408->16, and the tiny test sizes)
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import fields, replace

import torch

from pretrain.core.errors import UserError
from pretrain.model.vit import ViTSpec, build_model, spec_for, variant_names

StateDict = dict[str, torch.Tensor]

_SHOWN = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def first_keys(keys, n: int = _SHOWN) -> str:
    """``a, b, c and 4 more``: a short list for error messages."""
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def warn(meta: dict, message: str) -> None:
    """Record ``message`` in ``meta["warnings"]`` (the CLI prints these) and raise it as a
    Python warning for library callers."""
    meta.setdefault("warnings", []).append(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def heads_for_width(width: int) -> int | None:
    """Head count of the known variant with this width (None when no variant has it)."""
    table = {}
    for name in variant_names():
        spec = spec_for(name)
        table.setdefault(spec.width, spec.heads)
    return table.get(width)


def expected_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of ``VisionTransformer(spec)`` (nothing allocated)."""
    return {k: tuple(v.shape) for k, v in build_model(spec, device="meta").state_dict().items()}


def block_count(sd: StateDict) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def infer_spec(sd: StateDict, heads: int | None = None, where: str = "the weights") -> ViTSpec | None:
    """Spec of the ViT whose state dict (our keys) is ``sd``; None when the head count is unknown.

    Raises :class:`UserError` when a tensor that fixes a dimension is missing or has an
    impossible shape (e.g. a non-square position-embedding grid).
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise UserError(f"{where} lack {key!r}, so the model dimensions cannot be read off them; "
                            f"is this a plain ViT checkpoint?")
    proj = sd["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise UserError(f"{where}: patch_embed.proj.weight has shape {list(proj.shape)}; expected "
                        f"(width, 3, p, p) for square patches of RGB images")
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    pool = "cls" if "cls_token" in sd else "gap"
    tokens = int(sd["pos_embed"].shape[1]) - (1 if pool == "cls" else 0)
    side = _square(tokens)
    if side is None:
        raise UserError(f"{where}: pos_embed has {int(sd['pos_embed'].shape[1])} tokens, which is not a "
                        f"square grid{' plus a class token' if pool == 'cls' else ''}")
    heads = heads or heads_for_width(width)
    if heads is None:
        return None
    rep = int(sd["pre_logits.weight"].shape[0]) if "pre_logits.weight" in sd else None
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    proj_dim = int(sd["proj.weight"].shape[0]) if "proj.weight" in sd else None
    return ViTSpec(img_size=side * patch, patch_size=patch, width=width, depth=block_count(sd),
                   mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), heads=heads, num_classes=num_classes,
                   representation_size=rep, pool=pool, pre_norm="norm_pre.weight" in sd,
                   patch_bias="patch_embed.proj.bias" in sd, proj_dim=proj_dim)


def require_spec(spec: ViTSpec | None, sd: StateDict, where: str) -> ViTSpec:
    """``spec``, or a :class:`UserError` telling the user to pass ``--heads``."""
    if spec is not None:
        return spec
    width = int(sd["patch_embed.proj.weight"].shape[0]) if "patch_embed.proj.weight" in sd else "?"
    raise UserError(f"{where} do not say how many attention heads the model has, and width {width} is "
                    f"not a known variant width; pass --heads N (read_weights(..., heads=N))")


_RUNTIME_FIELDS = {"dropout", "attn_dropout", "head_bias_init", "act_ckpt"}  # in specs written before 0.2


def spec_from_dict(d: dict, where: str) -> ViTSpec:
    """A :class:`ViTSpec` from its ``to_dict()`` form; unknown fields are a :class:`UserError`.
    Run-time fields that older versions stored in the spec (dropout, head bias, activation
    checkpointing) are dropped."""
    names = {f.name for f in fields(ViTSpec)}
    d = {k: v for k, v in d.items() if k not in _RUNTIME_FIELDS}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: model_spec has fields this vitscale does not know: {first_keys(unknown)}; "
                        f"it was written by a newer version")
    try:
        return ViTSpec(**d)
    except TypeError as err:
        raise UserError(f"{where}: model_spec is not valid: {err}") from err


def check_state_dict(sd: StateDict, spec: ViTSpec, where: str) -> None:
    """Raise :class:`UserError` naming every missing, unexpected or mis-shaped key of ``sd``
    against ``VisionTransformer(spec)``."""
    want = expected_shapes(spec)
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [f"{k} {list(sd[k].shape)} (expected {list(want[k])})"
              for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {first_keys(missing)}")
    if shapes:
        problems.append(f"wrong shapes: {first_keys(shapes)}")
    if extra:
        problems.append(f"unexpected tensors: {first_keys(extra)}")
    if problems:
        dims = (f"width {spec.width}, depth {spec.depth}, heads {spec.heads}, patch {spec.patch_size}, "
                f"image {spec.img_size}, classes {spec.num_classes}")
        raise UserError(f"{where} do not match the model they describe ({dims}): {'; '.join(problems)}. "
                        f"The file is incomplete or from a different model; re-export it, or pass the right "
                        f"--from format")


def drop_head(sd: StateDict, spec: ViTSpec) -> tuple[StateDict, ViTSpec]:
    """The backbone alone: ``pre_logits.*`` and ``head.*`` removed, spec without a head."""
    kept = {k: v for k, v in sd.items() if not k.startswith(("pre_logits.", "head."))}
    return kept, replace(spec, num_classes=0, representation_size=None)


def cast(sd: StateDict, dtype: torch.dtype) -> StateDict:
    """Floating tensors cast to ``dtype`` (others unchanged), contiguous."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def dtype_names(sd: StateDict) -> list[str]:
    return sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})


def parameter_count(spec: ViTSpec) -> int:
    """Number of parameters of ``VisionTransformer(spec)`` (nothing allocated)."""
    return sum(math.prod(s) for s in expected_shapes(spec).values())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32; infinity when the shapes differ (a verification then fails)."""
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


def clip_parts(spec: ViTSpec) -> list[str]:
    """The CLIP-tower parts ``spec`` has (pre-norm, bias-free patch embedding, QuickGELU,
    projection), in words; [] for the ViT paper's model."""
    parts = ["a LayerNorm before the blocks (pre_norm)"] if spec.pre_norm else []
    parts += [] if spec.patch_bias else ["a patch embedding without bias"]
    parts += [] if spec.act == "gelu" else [f"the {spec.act} activation"]
    parts += [f"an output projection (proj_dim {spec.proj_dim})"] if spec.proj_dim else []
    return parts


def refuse_clip_parts(spec: ViTSpec, target: str) -> None:
    """:class:`UserError` when ``spec`` has CLIP-tower parts the plain ViT of ``target`` lacks."""
    parts = clip_parts(spec)
    if parts:
        raise UserError(f"{target} has no place for {', '.join(parts)}, which this model has; convert it "
                        f"--to safetensors, or back to the format it came from")
