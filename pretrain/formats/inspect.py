"""What a checkpoint or weights file holds, described on the CPU (``vitscale inspect``).

Format, model dimensions (:class:`~pretrain.model.vit.ViTSpec`), dtype, parameter count, and where
the format records them, step, world size, ZeRO stage and the run config. Formats whose registry
entry has a ``describe`` are described from headers, metadata and file lists alone (our
safetensors, DeepSpeed checkpoints: no model or optimizer state is loaded); the others (npz, timm,
HF, ...) are read into memory on the CPU to infer the dimensions from the tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.formats.registry import detect_format, read_weights, weights_format


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
    entry = weights_format(fmt or detect_format(path))
    body = entry.describe(path) if entry.describe is not None else _loaded(path, entry.name, heads)
    return {"path": str(path), "format": entry.name, **body}
