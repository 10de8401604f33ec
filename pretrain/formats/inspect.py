"""What a checkpoint or weights file holds, described on the CPU (``vitscale inspect``).

Format, model dimensions (:class:`~pretrain.model.vit.ViTSpec`), dtype, parameter count, and where
the format records them, step, world size, ZeRO stage and the run config. DeepSpeed checkpoints
are described from vitscale.json and their file list alone (no model or optimizer state is
loaded); our safetensors from its header. Other formats (npz, timm, HF) are read into memory
on the CPU to infer the dimensions from the tensors.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from pretrain.checkpoint.layout import read_meta
from pretrain.core.errors import UserError
from pretrain.formats import detect_format, read_weights
from pretrain.formats.deepspeed_ckpt import describe, resolve_universal
from pretrain.formats.ours import read_header, spec_of
from pretrain.formats.state_dict import expected_shapes, spec_from_dict
from pretrain.model.vit import ViTSpec

_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _count(spec: ViTSpec) -> int:
    return sum(math.prod(s) for s in expected_shapes(spec).values())


def _ours(path: Path) -> dict:
    meta, info = read_header(path)
    spec = spec_of(meta, str(path))
    out = {"spec": spec.to_dict(), "tensors": len(info),
           "dtype": ", ".join(sorted({_DTYPE.get(d, d) for _, d in info.values()})),
           "parameters": sum(math.prod(s) for s, _ in info.values())}
    for key in ("step", "source", "source_format"):
        if key in meta:
            out[key] = int(meta[key]) if key == "step" and meta[key].isdigit() else meta[key]
    if "run_config" in meta:
        out["config"] = json.loads(meta["run_config"])
    return out


def _deepspeed(path: Path) -> dict:
    info = describe(path)
    spec = info.pop("model_spec", None)
    out = {"spec": spec, "dtype": "float32 (ZeRO fp32 master weights in the optimizer shards)", **info}
    if spec is not None:
        out["parameters"] = _count(spec_from_dict(spec, str(path)))
    return out


def _universal(path: Path) -> dict:
    udir = resolve_universal(path)
    meta = read_meta(udir) or {}
    params = sorted(p.parent.name for p in (udir / "zero").glob("*/fp32.pt"))
    out = {"universal_dir": str(udir), "spec": meta.get("model_spec"), "dtype": "float32",
           "tensors": len(params), "files": sorted(f.name for f in udir.iterdir())}
    for key in ("step", "world_size", "zero_stage", "universal_from", "config"):
        if key in meta:
            out[key] = meta[key]
    if out["spec"] is not None:
        out["parameters"] = _count(spec_from_dict(out["spec"], str(udir)))
    return out


def _loaded(path: Path, fmt: str, heads: int | None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, spec, meta = read_weights(path, fmt, heads=heads)
    out = {"spec": spec.to_dict() if spec else None, "tensors": len(sd), "dtype": meta["dtype"],
           "parameters": sum(v.numel() for v in sd.values())}
    for key in ("layout", "prefix", "scanned", "hf_architectures", "warnings", "unmapped"):
        if key in meta:
            out[key] = meta[key]
    if spec is None:
        out["note"] = "head count unknown: pass --heads N"
    return out


def inspect(path: str | Path, fmt: str | None = None, heads: int | None = None) -> dict:
    """A JSON-able description of the checkpoint at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt == "safetensors":
        body = _ours(path)
    elif fmt == "deepspeed":
        body = _deepspeed(path)
    elif fmt == "deepspeed-universal":
        body = _universal(path)
    else:
        body = _loaded(path, fmt, heads)
    return {"path": str(path), "format": fmt, **body}
