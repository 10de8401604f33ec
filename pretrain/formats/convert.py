"""Conversion between checkpoint formats: the table of writers and the logit check.

Every source is read into our state dict (:func:`pretrain.formats.read_weights`), then written by
the :class:`Adapter` of the target format (:data:`ADAPTERS`); ``deepspeed-universal`` has no
writer here (it needs a ZeRO checkpoint as source, see :mod:`pretrain.checkpoint.universal`).

:func:`verify` checks what was written *before* it is moved into place (:func:`write_converted`
takes it as ``check``), on a fixed seeded batch, against every oracle at hand: (1) the output read
back by vitscale, with every missing / extra / mis-shaped key listed; (2) the output library's own
model loaded from the output (transformers for ``hf``, timm for ``timm``); (3) the source
library's own model loaded from the source (transformers for a HF folder, timm for a timm file or
Hub folder). (2) and (3) need the library installed; the report names each oracle it used (with
the library's version) and says which it could not use. A failed check leaves no output.
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
from pretrain.formats.timm import timm_kwargs, timm_weights, write_timm
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
    """A fresh temporary name beside ``dst`` (same folder, same suffix, so the format still shows)."""
    tmp = dst.with_name(f".{dst.stem}.tmp-convert{dst.suffix}")
    remove(tmp)
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


def _hf_oracle(path: Path, spec: ViTSpec, ours: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    """transformers' own model loaded from the HF folder ``path``, against ``ours``."""
    import transformers

    hf = load_hf_model(path)
    name = f"transformers {transformers.__version__} {type(hf).__name__}"
    with torch.no_grad():
        out = hf(pixel_values=x)
        feats = ours.forward_features(x)
        if type(hf).__name__ == "ViTForImageClassification":
            return f"{name} logits", _max_diff(out.logits, ours.forward_head(feats))
        if spec.representation_size:
            return (f"{name} pooler_output (our pre-logits)",
                    _max_diff(out.pooler_output, ours.forward_head(feats, pre_logits=True)))
        return f"{name} last_hidden_state", _max_diff(out.last_hidden_state, feats)


def _timm_oracle(path: Path, spec: ViTSpec, ours: VisionTransformer, x: torch.Tensor) -> tuple[str, float]:
    """timm's own model (``timm.create_model`` of a Hub folder's architecture, else its
    ``VisionTransformer`` for ``spec``) filled by timm's own loader, against ``ours``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights, hub = timm_weights(path)
    if hub is not None:
        kwargs = {"num_classes": hub.get("num_classes"), "global_pool": hub.get("global_pool"),
                  **(hub.get("model_args") or {})}
        model = timm.create_model(hub["architecture"], pretrained=False,
                                  **{k: v for k, v in kwargs.items() if v is not None})
        name = f"timm {timm.__version__} create_model({hub['architecture']!r})"
    else:
        model = TimmViT(**timm_kwargs(spec))
        name = f"timm {timm.__version__} VisionTransformer"
    timm.models.load_checkpoint(model, str(weights), filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        return f"{name} logits", _max_diff(model.eval()(x), ours(x))


_ORACLES = {"hf": ("transformers", _hf_oracle), "timm": ("timm", _timm_oracle)}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: max |diff| per oracle (what produced the reference output, and
    on which files), key problems, notes (what was not compared, and why)."""

    diffs: dict[str, float]
    key_problems: list[str]
    notes: list[str]
    atol: float

    @property
    def ok(self) -> bool:
        return not self.key_problems and all(d <= self.atol for d in self.diffs.values())

    def worst(self) -> tuple[str, float]:
        """(oracle, max |diff|) of the largest difference."""
        return max(self.diffs.items(), key=lambda kv: kv[1], default=("no oracle", 0.0))

    def lines(self) -> list[str]:
        out = [f"verify: oracle {name}: max |diff| {d:.3e} {'ok' if d <= self.atol else 'TOO LARGE'}"
               for name, d in self.diffs.items()]
        out += [f"verify: key problem: {p}" for p in self.key_problems]
        out += [f"verify: {s}" for s in self.notes]
        return out

    def verdict(self, dst: Path) -> str:
        """The one line that ends a verification: passed, or what failed, with the tolerance."""
        name, d = self.worst()
        if self.ok:
            return f"verify: passed: max |diff| {d:.3e} <= tolerance {self.atol:g} ({len(self.diffs)} oracle(s))"
        if self.key_problems:
            return (f"verify: FAILED: {len(self.key_problems)} key problem(s) (listed above), max |diff| {d:.3e}, "
                    f"tolerance {self.atol:g}; {dst} was not written")
        return f"verify: FAILED: max |diff| {d:.3e} > tolerance {self.atol:g} ({name}); {dst} was not written"


@dataclass(frozen=True)
class Source:
    """The source as read, before ``--drop-head`` / ``--dtype``: compared with its own library."""

    path: Path
    format: str
    sd: StateDict
    spec: ViTSpec


def verify(sd: StateDict, spec: ViTSpec, out: Path, to: str, *, source: Source | None = None,
           heads: int | None = None, atol: float = 1e-4) -> VerifyReport:
    """Compare, on :func:`fixed_batch`, our model built from ``sd`` (what was written to ``out``)
    with (1) ``out`` read back by vitscale, key by key and by logits; (2) the output library's own
    model loaded from ``out`` (transformers for ``hf``, timm for ``timm``); and (3) for a HF or timm
    source, the source library's own model loaded from the source, against ours built from
    ``source.sd`` (the reading, before ``--drop-head`` / ``--dtype``). (2) and (3) are skipped, with a
    note, when the library is not installed or cannot hold the model."""
    x = fixed_batch(spec)
    ref = _model(sd, spec)
    with torch.no_grad():
        ref_out = ref(x)
    diffs: dict[str, float] = {}
    problems: list[str] = []
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back_sd, back_spec, back_meta = read_weights(out, to, heads=heads or spec.heads)
    problems += [f"{k} missing in the output" for k in sd if k not in back_sd]
    problems += [f"{k} in the output has no source tensor" for k in back_sd if k not in sd]
    problems += [f"{k}: shape {list(back_sd[k].shape)} in the output, {list(sd[k].shape)} in the source"
                 for k in sd if k in back_sd and back_sd[k].shape != sd[k].shape]
    problems += [f"{k} dropped on reading the output" for k in back_meta.get("unmapped", [])]
    if back_spec is None:
        problems.append("the model dimensions cannot be read back from the output (pass --heads)")
    else:
        dims = [f.name for f in fields(ViTSpec) if f.name != "norm_eps"]
        problems += [f"spec field {n}: {getattr(back_spec, n)!r} read back, {getattr(spec, n)!r} written"
                     for n in dims if getattr(back_spec, n) != getattr(spec, n)]
        if back_spec.norm_eps != spec.norm_eps:
            notes.append(f"the {to} format does not record the LayerNorm epsilon: the output reads back with "
                         f"{back_spec.norm_eps:g}, the model has {spec.norm_eps:g} (the logits show the effect)")
    if not problems:
        with torch.no_grad():
            diffs[f"vitscale read-back of the output ({to})"] = _max_diff(_model(back_sd, back_spec)(x), ref_out)
    checks = []
    if to in _ORACLES:
        checks.append(("the output", *_ORACLES[to], out, spec, ref))
    if source is not None and source.format in _ORACLES:
        lib_spec = source.spec
        checks.append((f"the source {source.path}", *_ORACLES[source.format], source.path, lib_spec,
                       _model(source.sd, lib_spec)))
    for where, lib, oracle, path, lib_spec, ours in checks:
        try:
            __import__(lib)
        except ImportError:
            notes.append(f"{lib} is not installed: {where} was not compared with {lib}'s own model")
            continue
        if lib == "timm" and lib_spec.representation_size:
            notes.append(f"timm's VisionTransformer has no pre-logits layer: {where} was not compared with timm")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                name, d = oracle(path, lib_spec, ours, x)
            except (RuntimeError, ValueError, KeyError, OSError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if path == out:
                    problems.append(f"{lib} cannot load the output: {first[:300]}")
                else:
                    notes.append(f"{lib} could not load {where} ({first[:200]}): not compared with {lib}")
                continue
        diffs[f"{name} on {where}"] = d
    return VerifyReport(diffs, problems, notes, atol)


def write_converted(sd: StateDict, spec: ViTSpec, dst: Path, to: str, meta: dict,
                    check: Callable[[Path], bool] | None = None) -> bool:
    """Write with the adapter of ``to`` under a temporary name in DST's folder, then rename it into
    place; with ``check``, only when ``check(temporary path)`` is true. False: nothing was written
    (the temporary output is removed, an existing DST is untouched)."""
    adapter = ADAPTERS[to]
    tmp = tmp_path_for(dst)
    try:
        adapter.write(sd, spec, tmp, meta)
        if check is not None and not check(tmp):
            return False
        if adapter.directory:
            replace_dir(tmp, dst)
        else:
            tmp.replace(dst)
        return True
    finally:
        remove(tmp)


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
