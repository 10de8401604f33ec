"""Fine-tune surgery on a state dict: swap the head, resample the position embeddings.

The ViT paper fine-tunes by dropping the pretraining head (``pre_logits`` Linear+tanh and
``head``), putting one zero-initialised Linear in its place and interpolating ``pos_embed`` to the
new patch grid. A CLIP image tower's output projection (``proj``, :class:`ViTSpec` ``proj_dim``) is
part of the backbone: it is kept, and the new head reads the image embedding, when the target has
``proj_dim``; a target without one (``model.proj_dim=null``) drops it and reads the normed class
token, as timm's fine-tuned CLIP models do.

Everything else must match the target model exactly; anything that does not is a user mistake
(wrong ``model.name`` for the checkpoint, a checkpoint in another key layout) and is raised as
:class:`~pretrain.core.errors.UserError` naming the keys, the shapes and the likely cause.

Input is a state dict in the layout of :mod:`pretrain.model.vit` (other formats are converted before
they get here). Optimizer state is never involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from pretrain.core.errors import UserError
from pretrain.model.pos_embed import RESAMPLE_MODES, resample_pos_embed
from pretrain.model.vit import VisionTransformer, ViTSpec, build_model, variant_of

_HEAD = "head."
_PRE_LOGITS = "pre_logits."
_PROJ = "proj."
_SHOWN = 5


@dataclass
class SurgeryReport:
    """What the surgery did, key by key.

    ``dropped``: source keys left out; ``resampled``: key -> (source shape, new shape);
    ``new``: keys created here (the zero head); ``loaded``: number of source tensors carried into
    the result (resampled ones included), so ``loaded + len(new)`` is the result's size.
    """

    dropped: list[str] = field(default_factory=list)
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    loaded: int = 0

    def format(self) -> str:
        """Multi-line summary listing every dropped, resampled and new key."""
        resampled = [f"{k} {list(a)} -> {list(b)}" for k, (a, b) in self.resampled.items()]
        lines = [f"fine-tune surgery: loaded {self.loaded} tensors from the source"]
        for title, items in (("dropped", self.dropped), ("resampled", resampled),
                             ("new", self.new)):
            lines.append(f"  {title} ({len(items)}): {', '.join(items) if items else '-'}")
        return "\n".join(lines)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _first(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _source_arch(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Width, depth, MLP dim and patch size read off a state dict, where its keys show them."""
    arch: dict[str, int] = {}
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
    width = sd.get("norm.weight", sd.get("cls_token"))
    if width is not None:
        arch["width"] = int(width.shape[-1])
    patch = sd.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        arch["patch"] = int(patch.shape[-1])
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        arch["mlp_dim"] = int(fc1.shape[0])
    return arch


def _pool_hint(source: dict[str, torch.Tensor], target: ViTSpec) -> str:
    """" Likely cause: the source pools with model.pool=gap ...: set model.pool=gap.", or ""."""
    pool = "cls" if "cls_token" in source else "gap"
    if pool == target.pool or "pos_embed" not in source:
        return ""
    return (f" Likely cause: the source pools with model.pool={pool} (it {'has' if pool == 'cls' else 'has no'} "
            f"class token), the target with {target.pool}: set model.pool={pool}.")


def _arch_hint(source: dict[str, torch.Tensor], target: ViTSpec) -> str:
    """"source width 192 vs target 64, ...: choose model.name matching the checkpoint", or ""."""
    want = {"width": target.width, "depth": target.depth, "mlp_dim": target.mlp_dim,
            "patch": target.patch_size}
    arch = _source_arch(source)
    diffs = [f"source {k} {v} vs target {want[k]}" for k, v in arch.items() if v != want[k]]
    if not diffs:
        return ""
    name = variant_of(arch["width"], arch["depth"], arch["mlp_dim"], arch["patch"]) if len(arch) == 4 else None
    keys = {"width": "width", "depth": "depth", "mlp_dim": "mlp_dim", "patch": "patch_size"}
    fix = (f"set model.name={name}" if name else
           "set " + " ".join(f"model.{keys[k]}={v}" for k, v in arch.items()) + " (and model.heads)")
    return (f" Likely cause: {', '.join(diffs)}: {fix} to match the checkpoint, or leave model.name out of the "
            f"config to take the architecture from the weights.")


def _grid_tokens_error(n: int, target: ViTSpec) -> UserError:
    return UserError(
        f"source pos_embed has {n} grid tokens after {target.num_prefix_tokens} prefix token(s), which is "
        f"not a square grid: pass source_grid=(rows, cols), or check model.pool ({target.pool!r}) matches "
        f"the checkpoint (a class token adds one prefix token)."
    )


def _transfer(kept: dict[str, torch.Tensor], full_source: dict[str, torch.Tensor], target: ViTSpec,
              new: list[str], mode: str, source_grid: tuple[int, int] | None,
              report: SurgeryReport) -> dict[str, torch.Tensor]:
    """Check ``kept`` against the target's keys and shapes (``new`` keys exempt), resample
    ``pos_embed`` and return the tensors in the target's key order (``new`` keys excluded)."""
    if mode not in RESAMPLE_MODES:
        raise UserError(f"unknown pos-embed resample mode {mode!r}: choose {' or '.join(RESAMPLE_MODES)}.")
    expected = {k: _shape(v) for k, v in build_model(target, device="meta").state_dict().items()}
    missing = [k for k in expected if k not in kept and k not in new]
    unexpected = [k for k in kept if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) the target expects: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) the target lacks: {_first(unexpected)}")
        hint = _pool_hint(full_source, target) or _arch_hint(full_source, target)
        if "patch_embed.proj.weight" not in full_source:
            hint += (" The keys are not vitscale's: read a checkpoint of another layout with "
                     "pretrain.formats.read_weights first (vitscale finetune --init does).")
        raise UserError(f"the source is not a compatible ViT state dict for this model: {'; '.join(parts)}.{hint}")

    out: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        if key in new:
            continue
        value = kept[key]
        if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1] and (
            _shape(value) != want or (source_grid is not None and tuple(source_grid) != target.grid)
        ):
            n = value.shape[1] - target.num_prefix_tokens
            try:
                value = resample_pos_embed(value, target.grid, source_grid, target.num_prefix_tokens, mode)
            except ValueError as e:
                if source_grid is None and n > 0:
                    raise _grid_tokens_error(n, target) from e
                raise UserError(f"cannot resample the source pos_embed: {e}") from e
            report.resampled[key] = (_shape(kept[key]), _shape(value))
        if _shape(value) != want:
            hint = _arch_hint(full_source, target) or " The checkpoint was trained with another model config."
            raise UserError(f"shape mismatch at {key}: source {list(value.shape)} vs target {list(want)}."
                            + hint)
        out[key] = value
    report.loaded = len(out)
    return out


def resample_state_dict(
    source: dict[str, torch.Tensor],
    target: ViTSpec,
    mode: str = "bilinear",
    source_grid: tuple[int, int] | None = None,
) -> tuple[dict[str, torch.Tensor], SurgeryReport]:
    """The whole source (head and pre-logits kept) for ``target``'s image size: only ``pos_embed``
    is resampled to ``target.grid``. For evaluating or continuing a model on the same label set
    at another resolution. Keys and every other shape must match ``target`` exactly (UserError
    otherwise); the result loads into ``VisionTransformer(target)`` with ``strict=True``."""
    report = SurgeryReport()
    return _transfer(dict(source), source, target, [], mode, source_grid, report), report


def finetune_state_dict(
    source: dict[str, torch.Tensor],
    target: ViTSpec,
    keep_pre_logits: bool = False,
    mode: str = "bilinear",
    source_grid: tuple[int, int] | None = None,
    head_bias_init: float = 0.0,
) -> tuple[dict[str, torch.Tensor], SurgeryReport]:
    """Fine-tune weights for ``VisionTransformer(target)`` from a pretrained state dict.

    Drops every ``head.*`` key, unless ``keep_pre_logits`` every ``pre_logits.*`` key, and the
    projection ``proj.*`` when ``target.proj_dim`` is None (see the module docstring);
    resamples ``pos_embed`` from the source grid (square, inferred from the token count and
    ``target.num_prefix_tokens``, or ``source_grid`` for a non-square one) to ``target.grid``
    with ``mode`` (see :mod:`pretrain.model.pos_embed`); adds a new head of ``target.num_classes``
    outputs with zero weight and bias ``head_bias_init`` (0 by default: the paper's zero head),
    exactly as a fresh ``VisionTransformer(target, head_bias_init=...)`` initialises it. The result loads into
    ``VisionTransformer(target)`` with ``strict=True``; tensors keep the source dtype.

    ``target.representation_size`` must be None unless ``keep_pre_logits`` (then it must match the
    source's pre-logits width). Any missing or unexpected key, or any other shape difference,
    raises UserError naming the keys, the shapes and the likely cause.
    """
    if keep_pre_logits and not target.representation_size:
        raise UserError(
            "keep_pre_logits is set but the target model has no pre-logits layer: set "
            "model.representation_size to the checkpoint's pre-logits width, or drop keep_pre_logits."
        )
    if not keep_pre_logits and target.representation_size:
        raise UserError(
            f"the target model has a pre-logits layer (representation_size={target.representation_size}) but "
            f"keep_pre_logits is not set: fine-tuning replaces the whole head with one zero-initialised "
            f"Linear, so set model.representation_size to null, or set keep_pre_logits to keep the layer."
        )
    drop = (_HEAD,) if keep_pre_logits else (_HEAD, _PRE_LOGITS)
    drop += () if target.proj_dim else (_PROJ,)
    report = SurgeryReport(dropped=[k for k in source if k.startswith(drop)])
    kept = {k: v for k, v in source.items() if not k.startswith(drop)}
    report.new = [f"{_HEAD}weight", f"{_HEAD}bias"] if target.num_classes > 0 else []
    out = _transfer(kept, source, target, report.new, mode, source_grid, report)
    if target.num_classes > 0:
        d = target.representation_size or target.feature_dim
        dtype = source["pos_embed"].dtype
        out[f"{_HEAD}weight"] = torch.zeros(target.num_classes, d, dtype=dtype)
        out[f"{_HEAD}bias"] = torch.full((target.num_classes,), head_bias_init, dtype=dtype)
    return out, report


def apply_finetune_surgery(
    model: VisionTransformer,
    source: dict[str, torch.Tensor],
    keep_pre_logits: bool = False,
    mode: str = "bilinear",
    source_grid: tuple[int, int] | None = None,
) -> SurgeryReport:
    """:func:`finetune_state_dict` for ``model.spec``, loaded into ``model`` with ``strict=True``
    (values are copied into the model's own dtype and device)."""
    state, report = finetune_state_dict(source, model.spec, keep_pre_logits, mode, source_grid, model.head_bias_init)
    model.load_state_dict(state, strict=True)
    return report
