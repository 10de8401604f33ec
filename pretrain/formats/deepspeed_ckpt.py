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

Universal checkpoints (``deepspeed.checkpoint.ds_to_universal``) — what we found in 0.19.8:

- layout: ``OUT/zero/<param name>/{fp32,exp_avg,exp_avg_sq}.pt`` (full, unpartitioned tensors;
  flat 1-D for ZeRO-3 sources, a ``{"param": tensor}`` dict for ZeRO-1/2 sources),
  ``OUT/zero/optimizer_state.pt``, the ``*model_states.pt`` files copied, and a file
  ``latest_universal`` written into ``OUT``'s *parent* directory naming ``basename(OUT)``.
- ZeRO-1/2 checkpoints of a plain model carry no ``universal_checkpoint_info``; the tool refuses
  them unless ``--inject_missing_state`` is passed, so we always pass it.
- to resume from it with any world size: DeepSpeed config ``"checkpoint": {"load_universal": true}``
  and ``engine.load_checkpoint(dirname(OUT))`` (tag None): the engine then reads
  ``latest_universal`` instead of ``latest`` and restores weights and moments from ``zero/``.
- we copy ``vitscale.json`` into ``OUT`` with ``"format": "vitscale-deepspeed-universal"``,
  ``"universal_from": <source tag>`` and without the source's per-file checksums.
- naming: put ``OUT`` beside the tags but not named ``step_*`` (e.g.
  ``RUN_DIR/checkpoints/universal_step_00000100``), so that the training run's
  keep-last-K pruning, which lists ``step_*`` directories, leaves it alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.core.errors import UserError
from pretrain.formats.state_dict import StateDict, expected_shapes, first_keys, spec_from_dict
from pretrain.model.vit import ViTSpec

META = "vitscale.json"
FORMAT = "vitscale-deepspeed"
UNIVERSAL_FORMAT = "vitscale-deepspeed-universal"


def is_tag_dir(p: Path) -> bool:
    has_states = (p / META).is_file() or any(p.glob("*model_states.pt"))
    return p.is_dir() and has_states and not (p / "zero").is_dir()


def is_universal_dir(p: Path) -> bool:
    return p.is_dir() and (p / "zero").is_dir() and any(p.glob("*model_states.pt"))


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
            tag = latest.read_text().strip()
            if not (ckdir / tag).is_dir():
                raise UserError(f"{latest} names tag {tag!r} but {ckdir / tag} does not exist; pass a tag "
                                f"directory that exists, e.g. one of: {first_keys(_tags(ckdir)) or 'none'}")
            return ckdir, tag
    raise UserError(f"{p} is not a DeepSpeed checkpoint: expected a run directory (with checkpoints/latest), "
                    f"a checkpoints directory (with a 'latest' file) or a tag directory holding "
                    f"*model_states.pt files")


def _tags(ckdir: Path) -> list[str]:
    return sorted(d.name for d in ckdir.iterdir() if is_tag_dir(d) and not d.name.startswith("."))


def read_meta(tag_dir: Path) -> dict:
    """vitscale.json of a tag (or universal) dir; {} when absent, :class:`UserError` if unreadable."""
    f = tag_dir / META
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{f} is not valid JSON ({err}); the checkpoint save was interrupted") from err


def spec_from_meta(meta: dict, where: Path) -> ViTSpec | None:
    return spec_from_dict(meta["model_spec"], str(where / META)) if "model_spec" in meta else None


def describe(path: str | Path) -> dict:
    """What a DeepSpeed checkpoint holds, from vitscale.json and file names alone (nothing loaded)."""
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir = ckdir / tag
    meta = read_meta(tag_dir)
    files = {f.name: f.stat().st_size for f in sorted(tag_dir.iterdir()) if f.is_file()}
    optim = [n for n in files if n.endswith("optim_states.pt")]
    info = {"checkpoints_dir": str(ckdir), "tag": tag, "tags": _tags(ckdir), "files": files,
            "optimizer_shards": len(optim)}
    for key in ("step", "world_size", "zero_stage", "version", "config", "model_spec"):
        if key in meta:
            info[key] = meta[key]
    if "world_size" in meta and len(optim) != meta["world_size"]:
        info["problem"] = (f"{len(optim)} optimizer shard files for world size {meta['world_size']}: "
                           f"the checkpoint is incomplete")
    if (ckdir / "latest_universal").is_file():
        info["latest_universal"] = (ckdir / "latest_universal").read_text().strip()
    return info


def consolidate_deepspeed(path: str | Path,
                          dtype: torch.dtype | None = None) -> tuple[StateDict, ViTSpec | None, dict]:
    """(full state dict, spec, meta) of a ZeRO checkpoint, on CPU, without its process count.

    ``path``: run dir, checkpoints dir or tag dir. Tensors are fp32 master weights, cast to
    ``dtype`` when given. ``meta``: vitscale.json's step, world size, ZeRO stage, config, plus
    ``checkpoints_dir`` and ``tag``. The spec comes from vitscale.json (None without one).
    """
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir = ckdir / tag
    meta = read_meta(tag_dir)
    spec = spec_from_meta(meta, tag_dir)
    from deepspeed.utils import zero_to_fp32

    try:
        with contextlib.redirect_stdout(sys.stderr):
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
    meta = read_meta(udir)
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


def to_universal(path: str | Path, out_dir: str | Path) -> dict:
    """Convert a ZeRO checkpoint to a universal one in ``out_dir`` (which must not exist).

    Runs ``python -m deepspeed.checkpoint.ds_to_universal`` in a subprocess (DeepSpeed's default
    4 extract / 2 merge workers, fewer on smaller machines), then writes ``out_dir/vitscale.json``.
    Returns the new vitscale.json contents.
    """
    cpus = os.cpu_count() or 1
    ckdir, tag = resolve_deepspeed_checkpoint(path)
    tag_dir, out_dir = ckdir / tag, Path(out_dir)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out_dir), "--inject_missing_state",
           "--num_extract_workers", str(min(4, cpus)), "--num_merge_workers", str(min(2, cpus))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not is_universal_dir(out_dir):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        shutil.rmtree(out_dir / "tmp", ignore_errors=True)
        raise UserError(f"DeepSpeed's ds_to_universal failed on {tag_dir} (exit {proc.returncode}):\n{tail}")
    meta = read_meta(tag_dir)
    meta.pop("files", None)
    meta.update(format=UNIVERSAL_FORMAT, universal_from=tag)
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    return meta
