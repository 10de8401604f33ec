"""Our consolidated weights: one safetensors file that rebuilds the model with no other file.

Layout: the state dict of :class:`~pretrain.model.vit.VisionTransformer` (keys in model.py's docstring),
saved with ``safetensors.torch.save_file`` and the string metadata

    format      "vitscale"
    model_spec  json.dumps(ViTSpec.to_dict())
    step        optional, the training step the weights come from
    source      optional, what they were converted from (and source_format)
    run_config  optional, json of the training run's resolved config (from a DeepSpeed checkpoint)
    (any other key a caller passes in ``extra_meta``; values are stored as strings)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pretrain.core.errors import UserError
from pretrain.formats.state_dict import StateDict, check_state_dict, spec_from_dict
from pretrain.model.vit import ViTSpec

FORMAT = "vitscale"
_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def save_safetensors(sd: StateDict, spec: ViTSpec, path: str | Path, extra_meta: dict | None = None) -> None:
    """Write ``sd`` with ``spec`` in the metadata, atomically (a temporary file renamed into place).

    ``sd`` must match ``spec`` exactly (checked; :class:`UserError` otherwise). ``extra_meta``
    values are converted with ``str`` (``step``, ``source``, ...).
    """
    path = Path(path)
    check_state_dict(sd, spec, f"the weights to save to {path}")
    meta = {k: str(v) for k, v in (extra_meta or {}).items() if v is not None}
    meta.update(format=FORMAT, model_spec=json.dumps(spec.to_dict()))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """(metadata, key -> (shape, dtype)) of a safetensors file, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            info = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(k)
                info[k] = (list(sl.get_shape()), str(sl.get_dtype()))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file: {err}") from err
    return meta, info


def spec_of(meta: dict[str, str], where: str) -> ViTSpec:
    """The spec stored in our metadata."""
    try:
        return spec_from_dict(json.loads(meta["model_spec"]), where)
    except (KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{where} has no readable 'model_spec' metadata; it was not written by vitscale "
                        f"(convert it: `vitscale convert {where} OUT.safetensors --to safetensors`)") from err


def load_safetensors(path: str | Path) -> tuple[StateDict, ViTSpec, dict]:
    """(state dict, spec, metadata) of a file written by :func:`save_safetensors`.

    ``metadata`` holds the stored strings with ``step`` as an int when present. The state dict
    is checked against the spec (a :class:`UserError` names any missing or mis-shaped key).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    meta, _ = read_header(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a vitscale safetensors file (metadata format="
                        f"{meta.get('format')!r}); read it with pretrain.formats.read_weights, which detects "
                        f"other layouts")
    spec = spec_of(meta, str(path))
    sd = load_file(str(path))
    check_state_dict(sd, spec, str(path))
    out = dict(meta)
    if out.get("step", "").isdigit():
        out["step"] = int(out["step"])
    return sd, spec, out


def is_ours(p: Path) -> bool:
    """A ``.safetensors`` file whose metadata says ``format: vitscale`` (header only)."""
    return p.is_file() and p.suffix.lower() == ".safetensors" and read_header(p)[0].get("format") == FORMAT


def write_ours(sd: StateDict, spec: ViTSpec, path: Path, meta: dict) -> None:
    """:func:`save_safetensors` with what a conversion knows of the source (step, source, its format,
    the run config of a training checkpoint)."""
    run_config = json.dumps(meta["config"]) if "config" in meta else None
    save_safetensors(sd, spec, path, {"step": meta.get("step"), "source": meta.get("source"),
                                      "source_format": meta.get("format"), "run_config": run_config})


def describe_safetensors(path: Path) -> dict:
    """What ``vitscale inspect`` shows of our file, from its header alone."""
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
