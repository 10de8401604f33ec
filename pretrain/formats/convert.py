"""Conversion between checkpoint formats: the table of writers and the logit check.

Every source is read into our state dict (:func:`pretrain.formats.read_weights`), then written by
the :class:`Adapter` of the target format (:data:`ADAPTERS`); ``deepspeed-universal`` has no
writer here (it needs a ZeRO checkpoint as source, see :mod:`pretrain.checkpoint.universal`).

:func:`verify` builds our model from the weights that were written and compares, on a fixed seeded
batch: (1) the output read back by vitscale, with every missing / extra / mis-shaped key listed;
(2) the other library's own model loaded from the output when it is installed (transformers for
``hf``, timm for ``timm``), and the source HF model when the source is HF.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pretrain.checkpoint.layout import is_universal_dir
from pretrain.core.errors import UserError
from pretrain.formats import read_weights, save_safetensors
from pretrain.formats.hf import is_hf_dir, load_hf_model, write_hf
from pretrain.formats.npz import write_vit_jax_npz
from pretrain.formats.state_dict import StateDict
from pretrain.formats.timm import load_tensors, timm_kwargs, write_timm
from pretrain.model.vit import VisionTransformer, ViTSpec, build_model


@dataclass(frozen=True)
class Adapter:
    """How to write one target format: ``write(sd, spec, dst, meta)``; ``directory``: DST is a dir."""

    write: Callable[[StateDict, ViTSpec, Path, dict], None] | None
    directory: bool
    looks_like: Callable[[Path], bool]
    note: str


def _write_ours(sd: StateDict, spec: ViTSpec, dst: Path, meta: dict) -> None:
    run_config = json.dumps(meta["config"]) if "config" in meta else None
    save_safetensors(sd, spec, dst, {"step": meta.get("step"), "source": meta.get("source"),
                                     "source_format": meta.get("format"), "run_config": run_config})


def _write_npz(sd: StateDict, spec: ViTSpec, dst: Path, meta: dict) -> None:
    write_vit_jax_npz(sd, spec, dst)


ADAPTERS: dict[str, Adapter] = {
    "safetensors": Adapter(_write_ours, False, Path.is_file, "consolidated safetensors, spec in metadata"),
    "deepspeed-universal": Adapter(None, True, is_universal_dir, "DeepSpeed universal checkpoint"),
    "hf": Adapter(lambda sd, spec, dst, meta: write_hf(sd, spec, dst), True, is_hf_dir,
                  "HF transformers ViT directory"),
    "timm": Adapter(lambda sd, spec, dst, meta: write_timm(sd, spec, dst), False, Path.is_file,
                    "timm VisionTransformer state dict (.pth or .safetensors)"),
    "npz": Adapter(_write_npz, False, Path.is_file, "Google vit_jax .npz"),
}


def check_dst(src: Path, dst: Path, to: str, force: bool) -> None:
    adapter = ADAPTERS[to]
    s, d = src.resolve(), dst.resolve()
    if d == s or s.is_relative_to(d):
        raise UserError(f"DST {dst} is (or contains) the source {src}; choose another output path")
    if not dst.parent.is_dir():
        raise UserError(f"the directory {dst.parent} for DST does not exist; create it first")
    if not dst.exists():
        return
    if not force:
        raise UserError(f"{dst} already exists; pass --force to replace it, or choose another DST")
    if dst.is_dir() != adapter.directory or (dst.is_dir() and not adapter.looks_like(dst)):
        kind = "directory" if dst.is_dir() else "file"
        raise UserError(f"{dst} is a {kind} that is not a {adapter.note}; --force only replaces an output of "
                        f"the same format. Remove it yourself or choose another DST")


def replace_dir(tmp: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def tmp_path_for(dst: Path) -> Path:
    tmp = dst.with_name(f".{dst.stem}.tmp-convert{dst.suffix}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def fixed_batch(spec: ViTSpec, n: int = 2) -> torch.Tensor:
    """The seeded input every verification uses."""
    return torch.randn(n, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))


def _model(sd: StateDict, spec: ViTSpec) -> VisionTransformer:
    model = build_model(spec)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


def _hf_outputs(path: Path, spec: ViTSpec, ref: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    hf = load_hf_model(path)
    with torch.no_grad():
        out = hf(pixel_values=x)
        feats = ref.forward_features(x)
        if type(hf).__name__ == "ViTForImageClassification":
            return ("transformers ViTForImageClassification logits",
                    _max_diff(out.logits, ref.forward_head(feats)))
        if spec.representation_size:
            return ("transformers ViTModel pooler_output vs our pre-logits",
                    _max_diff(out.pooler_output, ref.forward_head(feats, pre_logits=True)))
        return "transformers ViTModel last_hidden_state", _max_diff(out.last_hidden_state, feats)


def _timm_output(path: Path, spec: ViTSpec, ref: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(**timm_kwargs(spec))
    model.load_state_dict(load_tensors(path)[0])
    with torch.no_grad():
        return "timm VisionTransformer logits", _max_diff(model.eval()(x), ref(x))


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: max |diff| per comparison, key problems, what was skipped."""

    diffs: dict[str, float]
    key_problems: list[str]
    skipped: list[str]
    atol: float

    @property
    def ok(self) -> bool:
        return not self.key_problems and all(d <= self.atol for d in self.diffs.values())

    def lines(self) -> list[str]:
        out = [f"verify: {name}: max |diff| {d:.3e} {'ok' if d <= self.atol else 'TOO LARGE'}"
               for name, d in self.diffs.items()]
        out += [f"verify: key problem: {p}" for p in self.key_problems]
        out += [f"verify: {s}" for s in self.skipped]
        out.append(f"verify: {'passed' if self.ok else 'FAILED'} (tolerance {self.atol:g})")
        return out


@dataclass(frozen=True)
class Source:
    """The source as read, before ``--drop-head`` / ``--dtype``: compared with its own library."""

    path: Path
    format: str
    sd: StateDict
    spec: ViTSpec


def verify(sd: StateDict, spec: ViTSpec, dst: Path, to: str, *, source: Source | None = None,
           heads: int | None = None, atol: float = 1e-4) -> VerifyReport:
    """Compare our model built from ``sd`` (what was written) with everything built from ``dst``,
    and, for a HF source, the source's own transformers model with ours built from ``source.sd``."""
    x = fixed_batch(spec)
    ref = _model(sd, spec)
    with torch.no_grad():
        ref_out = ref(x)
    diffs: dict[str, float] = {}
    problems: list[str] = []
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back_sd, back_spec, back_meta = read_weights(dst, to, heads=heads or spec.heads)
    problems += [f"{k} missing in {dst}" for k in sd if k not in back_sd]
    problems += [f"{k} in {dst} has no source tensor" for k in back_sd if k not in sd]
    problems += [f"{k}: shape {list(back_sd[k].shape)} in {dst}, {list(sd[k].shape)} in the source"
                 for k in sd if k in back_sd and back_sd[k].shape != sd[k].shape]
    problems += [f"{k} dropped on reading {dst}" for k in back_meta.get("unmapped", [])]
    if back_spec is None:
        problems.append(f"the model dimensions cannot be read back from {dst} (pass --heads)")
    else:
        dims = [f.name for f in fields(ViTSpec)]
        problems += [f"spec field {n}: {getattr(back_spec, n)!r} read back, {getattr(spec, n)!r} written"
                     for n in dims if getattr(back_spec, n) != getattr(spec, n)]
    if not problems:
        with torch.no_grad():
            diffs[f"{dst} read back by vitscale"] = _max_diff(_model(back_sd, back_spec)(x), ref_out)
    checks = []
    if to == "hf":
        checks.append(("transformers", _hf_outputs, dst, spec, ref))
    if to == "timm":
        checks.append(("timm", _timm_output, dst, spec, ref))
    if source is not None and source.format == "hf":
        src_dir = source.path if source.path.is_dir() else source.path.parent
        checks.append(("transformers", _hf_outputs, src_dir, source.spec, _model(source.sd, source.spec)))
    for lib, fn, path, lib_spec, ours in checks:
        try:
            __import__(lib)
        except ImportError:
            skipped.append(f"{lib} is not installed: checked keys and shapes only for {path}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name, d = fn(path, lib_spec, ours, x)
        diffs[f"{name} ({path}) vs vitscale"] = d
    return VerifyReport(diffs, problems, skipped, atol)




def write_converted(sd: StateDict, spec: ViTSpec, dst: Path, to: str, meta: dict) -> None:
    """Write with the adapter of ``to`` under a temporary name, then rename into place."""
    adapter = ADAPTERS[to]
    tmp = tmp_path_for(dst)
    try:
        adapter.write(sd, spec, tmp, meta)
        if adapter.directory:
            replace_dir(tmp, dst)
        else:
            tmp.replace(dst)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
