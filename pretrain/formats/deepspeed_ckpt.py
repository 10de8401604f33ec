"""DeepSpeed ZeRO training checkpoints and DeepSpeed universal checkpoints.

Our training checkpoints (written by the engine)::

    RUN_DIR/config.yaml                     resolved run config
    RUN_DIR/checkpoints/latest              names the newest complete tag, e.g. step_00000100
    RUN_DIR/checkpoints/step_00000100/      engine.save_checkpoint(RUN_DIR/checkpoints, tag=...):
        *model_states.pt                    mp_rank_00_model_states.pt (ZeRO-1/2) or
                                            zero_pp_rank_{r}_mp_rank_00_model_states.pt (ZeRO-3)
        *zero_pp_rank_{r}_*optim_states.pt  fp32 master weights + Adam moments of rank r
        vitscale.json                       {"format": "vitscale-deepspeed", "model_spec": {...},
                                             "step", "world_size", "zero_stage", "version", "config"}

Consolidation uses DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` (any stage, any world size,
no process group). It is called in ``lazy_mode``: the optimizer shards are memory-mapped and each
parameter is gathered from them on its own, so the process holds one fp32 copy of the weights
(the result) rather than the shards plus the result. ZeRO-1/2 shards are concatenated per
parameter group by DeepSpeed itself; the result's tensors are views of that one buffer.

Universal checkpoints (:mod:`pretrain.checkpoint.universal` converts; this module reads their
``zero/<param>/fp32.pt`` files). The checkpoint layout itself (file names, ``vitscale.json``, tag
names, format names) belongs to :mod:`pretrain.checkpoint.layout`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from pretrain.checkpoint.layout import META, is_tag_dir, is_universal_dir, read_latest, read_meta, tags_of
from pretrain.checkpoint.sharded import assemble
from pretrain.core.errors import UserError
from pretrain.formats.state_dict import StateDict, expected_shapes, first_keys, parameter_count, spec_from_dict
from pretrain.model.vit import ViTSpec


def resolve_deepspeed_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) of a run dir, its ``checkpoints`` dir (via ``latest``) or a tag dir."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if is_tag_dir(p):
        return p.parent, p.name
    for ckdir in (p / "checkpoints", p):
        latest = ckdir / "latest"
        if latest.is_file():
            tag = read_latest(ckdir)
            if tag is None or not (ckdir / tag).is_dir():
                named = latest.read_bytes()[:40]
                raise UserError(f"{latest} names {named!r}, which is not an existing checkpoint tag; pass a tag "
                                f"directory that exists, e.g. one of: {first_keys(tags_of(ckdir)) or 'none'}")
            return ckdir, tag
    raise UserError(f"{p} is not a DeepSpeed checkpoint: expected a run directory (with checkpoints/latest), "
                    f"a checkpoints directory (with a 'latest' file) or a tag directory holding "
                    f"*model_states.pt files")


def _pointer(p: Path) -> str | None:
    """What the first of ``p/checkpoints``, ``p`` that holds a pointer file points to: ``latest``
    -> "deepspeed", ``latest_universal`` naming a universal checkpoint -> "deepspeed-universal"."""
    for d in (p / "checkpoints", p):
        if (d / "latest").is_file():
            return "deepspeed"
        pointer = d / "latest_universal"
        if pointer.is_file() and is_universal_dir(d / pointer.read_text().strip()):
            return "deepspeed-universal"
    return None


def is_zero_checkpoint(p: Path) -> bool:
    """A tag directory (``*model_states.pt`` / vitscale.json), or a checkpoints or run directory
    whose pointer is ``latest``."""
    return p.is_dir() and (is_tag_dir(p) or (not is_universal_dir(p) and _pointer(p) == "deepspeed"))


def is_universal_checkpoint(p: Path) -> bool:
    """A universal checkpoint (``zero/`` + ``*model_states.pt``), or a directory whose first
    pointer is a ``latest_universal`` naming one."""
    return p.is_dir() and (is_universal_dir(p) or (not is_tag_dir(p) and _pointer(p) == "deepspeed-universal"))


def spec_from_meta(meta: dict, where: Path) -> ViTSpec | None:
    return spec_from_dict(meta["model_spec"], str(where / META)) if "model_spec" in meta else None


def describe_zero(path: str | Path) -> dict:
    """What a DeepSpeed checkpoint holds, from vitscale.json and file names alone (nothing loaded)."""
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir = ckdir / tag
    meta = read_meta(tag_dir) or {}
    files = {f.name: f.stat().st_size for f in sorted(tag_dir.iterdir()) if f.is_file()}
    optim = [n for n in files if n.endswith("optim_states.pt")]
    info = {"checkpoints_dir": str(ckdir), "tag": tag, "tags": tags_of(ckdir), "files": files,
            "optimizer_shards": len(optim)}
    for key in ("step", "world_size", "zero_stage", "version", "config", "model_spec"):
        if key in meta:
            info[key] = meta[key]
    if "world_size" in meta and len(optim) != meta["world_size"]:
        info["problem"] = (f"{len(optim)} optimizer shard files for world size {meta['world_size']}: "
                           f"the checkpoint is incomplete")
    if (ckdir / "latest_universal").is_file():
        info["latest_universal"] = (ckdir / "latest_universal").read_text().strip()
    spec = info.pop("model_spec", None)
    out = {"spec": spec, "dtype": "float32 (ZeRO fp32 master weights in the optimizer shards)", **info}
    if spec is not None:
        out["parameters"] = parameter_count(spec_from_dict(spec, str(path)))
    return out


def describe_universal(path: str | Path) -> dict:
    """What a universal checkpoint holds, from vitscale.json and its file list (nothing loaded)."""
    udir = resolve_universal(path)
    meta = read_meta(udir) or {}
    params = sorted(p.parent.name for p in (udir / "zero").glob("*/fp32.pt"))
    out = {"universal_dir": str(udir), "spec": meta.get("model_spec"), "dtype": "float32",
           "tensors": len(params), "files": sorted(f.name for f in udir.iterdir())}
    for key in ("step", "world_size", "zero_stage", "universal_from", "config"):
        if key in meta:
            out[key] = meta[key]
    if out["spec"] is not None:
        out["parameters"] = parameter_count(spec_from_dict(out["spec"], str(udir)))
    return out


def _quiet_zero_to_fp32():
    """DeepSpeed's consolidation module, imported without its accelerator banner (our commands
    print what was read themselves; its progress prints are dropped by the caller)."""
    import logging
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger, zero_to_fp32

    logger.setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return zero_to_fp32


def consolidate_deepspeed(path: str | Path,
                          dtype: torch.dtype | None = None) -> tuple[StateDict, ViTSpec | None, dict]:
    """(full state dict, spec, meta) of a ZeRO checkpoint, on CPU, without its process count.

    ``path``: run dir, checkpoints dir or tag dir. Tensors are fp32 master weights, cast to
    ``dtype`` when given. ``meta``: vitscale.json's step, world size, ZeRO stage, config, plus
    ``checkpoints_dir`` and ``tag``. The spec comes from vitscale.json (None without one).
    """
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir = ckdir / tag
    meta = read_meta(tag_dir) or {}
    spec = spec_from_meta(meta, tag_dir)
    zero_to_fp32 = _quiet_zero_to_fp32()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lazy = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag, lazy_mode=True)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"cannot consolidate the DeepSpeed checkpoint {tag_dir}: {err}. Every rank's "
                        f"*_optim_states.pt and *model_states.pt file must be present (is the save "
                        f"complete?)") from err
    sd: StateDict = {}
    for name in list(lazy):
        t = lazy.pop(name)
        t = t.contiguous()
        sd[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    out = {k: meta[k] for k in ("step", "world_size", "zero_stage", "version", "config") if k in meta}
    out.update(checkpoints_dir=str(ckdir), tag=tag)
    return sd, spec, out


def consolidate_ema(path: str | Path) -> tuple[StateDict, ViTSpec | None, dict]:
    """(full fp32 EMA state dict, spec, meta) of a ZeRO checkpoint whose run kept an EMA
    (``ema.decay``), assembled from every rank's partitions (:mod:`pretrain.checkpoint.sharded`)."""
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir = ckdir / tag
    meta = read_meta(tag_dir) or {}
    files = sorted(tag_dir.glob("rank_*.pt"))
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True).get("ema") for f in files]
    if not files or any(s is None for s in states):
        raise UserError(f"{tag_dir} holds no EMA weights (its run had ema.decay=0); use the trained weights instead "
                        f"(drop --ema, or finetune.init_weights=model)")
    try:
        sd = assemble(states)
    except ValueError as err:
        raise UserError(f"{tag_dir}: the EMA pieces of its rank files do not fit together ({err}); is every "
                        f"rank_*.pt file of the save there?") from err
    out = {k: meta[k] for k in ("step", "world_size", "zero_stage", "version", "config") if k in meta}
    out.update(checkpoints_dir=str(ckdir), tag=tag, weights="ema")
    return sd, spec_from_meta(meta, tag_dir), out


def resolve_universal(path: str | Path) -> Path:
    """The universal checkpoint dir of ``path`` (itself, or what ``latest_universal`` names)."""
    p = Path(path)
    if is_universal_dir(p):
        return p
    for ckdir in (p / "checkpoints", p):
        latest = ckdir / "latest_universal"
        if latest.is_file() and is_universal_dir(ckdir / latest.read_text().strip()):
            return ckdir / latest.read_text().strip()
    raise UserError(f"{p} is not a DeepSpeed universal checkpoint: expected a directory with "
                    f"zero/<param>/fp32.pt files and *model_states.pt, or one with a 'latest_universal' "
                    f"file naming such a directory")


def read_universal(path: str | Path) -> tuple[StateDict, ViTSpec | None, dict]:
    """(state dict, spec, meta) of a universal checkpoint; reads only ``zero/*/fp32.pt``.

    Flat tensors (ZeRO-3 sources) are reshaped to the shapes of the spec in vitscale.json, or
    without one to the ``param_shapes`` recorded in the copied model-states file.
    """
    udir = resolve_universal(path)
    meta = read_meta(udir) or {}
    spec = spec_from_meta(meta, udir)
    shapes = expected_shapes(spec) if spec is not None else _recorded_shapes(udir)
    sd: StateDict = {}
    for f in sorted((udir / "zero").glob("*/fp32.pt")):
        name = f.parent.name
        obj = torch.load(f, map_location="cpu", weights_only=True)
        t = obj["param"] if isinstance(obj, dict) else obj
        if name in shapes:
            if t.numel() != torch.Size(shapes[name]).numel():
                raise UserError(f"{f} holds {t.numel()} values but {name} has shape {list(shapes[name])}; "
                                f"the universal checkpoint and its {META} / model states disagree")
            t = t.reshape(shapes[name])
        sd[name] = t
    if not sd:
        raise UserError(f"{udir / 'zero'} holds no <param>/fp32.pt files")
    out = {k: meta[k] for k in ("step", "world_size", "zero_stage", "version", "config", "universal_from")
           if k in meta}
    return sd, spec, out


def _recorded_shapes(udir: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(udir.glob("*model_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    groups = state.get("param_shapes") or []
    return {k: tuple(v) for group in groups for k, v in group.items()}
