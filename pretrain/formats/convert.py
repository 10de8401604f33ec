"""Conversion between checkpoint formats: writing through the registry, and the logit check.

Every source is read into our state dict (:func:`pretrain.formats.read_weights`), then written by
the ``write`` of the target format's :class:`~pretrain.formats.registry.WeightsFormat`;
``deepspeed-universal`` has none (it is written from a ZeRO checkpoint as it is, see
:mod:`pretrain.checkpoint.universal`).

:func:`verify` checks what was written *before* it is moved into place (:func:`write_converted`
takes it as ``check``), on a fixed seeded batch, against every oracle at hand: (1) the output read
back by vitscale, with every missing / extra / mis-shaped key listed; (2) the output library's own
model loaded from the output (the target entry's oracle: transformers for ``hf``, timm for
``timm``); (3) the source library's own model loaded from the source (the source entry's oracle:
transformers for a HF folder, timm for a timm file or Hub folder). (2) and (3) need the library
installed; the report names each oracle it used (with the library's version) and says which it
could not use. A failed check leaves no output.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pretrain.core.errors import UserError
from pretrain.formats.registry import read_weights, weights_format
from pretrain.formats.state_dict import StateDict, max_abs_diff
from pretrain.model.vit import VisionTransformer, ViTSpec, build_model

# spec fields that fix no parameter: a format may not record them (the output then reads back with
# its default), which verify notes and the logits measure
_NOT_PARAMETERS = ("norm_eps", "act")


def check_dst(src: Path, dst: Path, to: str, force: bool) -> None:
    entry = weights_format(to)
    s, d = src.resolve(), dst.resolve()
    if d == s or s.is_relative_to(d):
        raise UserError(f"DST {dst} is (or contains) the source {src}; choose another output path")
    if not dst.parent.is_dir():
        raise UserError(f"the directory {dst.parent} for DST does not exist; create it first")
    if not dst.exists():
        return
    if not force:
        raise UserError(f"{dst} already exists; pass --force to replace it, or choose another DST")
    owns = entry.replaceable or entry.detect
    if dst.is_dir() != entry.directory or not owns(dst):
        kind = "directory" if dst.is_dir() else "file"
        raise UserError(f"{dst} is a {kind} that is not a {entry.summary}; --force only replaces an output of "
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
        dims = [f.name for f in fields(ViTSpec) if f.name not in _NOT_PARAMETERS]
        problems += [f"spec field {n}: {getattr(back_spec, n)!r} read back, {getattr(spec, n)!r} written"
                     for n in dims if getattr(back_spec, n) != getattr(spec, n)]
        if back_spec.norm_eps != spec.norm_eps:
            notes.append(f"the {to} format does not record the LayerNorm epsilon: the output reads back with "
                         f"{back_spec.norm_eps:g}, the model has {spec.norm_eps:g} (the logits show the effect)")
        if back_spec.act != spec.act:
            notes.append(f"the {to} output does not record the activation: it reads back as {back_spec.act}, the "
                         f"model has {spec.act} (the logits show the effect)")
    if not problems:
        with torch.no_grad():
            diffs[f"vitscale read-back of the output ({to})"] = max_abs_diff(_model(back_sd, back_spec)(x), ref_out)
    checks = []
    if (oracle := weights_format(to).oracle) is not None:
        checks.append(("the output", oracle, out, spec, ref))
    if source is not None and (oracle := weights_format(source.format).oracle) is not None:
        checks.append((f"the source {source.path}", oracle, source.path, source.spec, _model(source.sd, source.spec)))
    for where, oracle, path, lib_spec, ours in checks:
        lib = oracle.library
        try:
            __import__(lib)
        except ImportError:
            notes.append(f"{lib} is not installed: {where} was not compared with {lib}'s own model")
            continue
        if (reason := oracle.cannot(lib_spec)) is not None:
            notes.append(f"{reason}: {where} was not compared with {lib}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                name, d = oracle.compare(path, lib_spec, ours, x)
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
    """Write with the registry's writer of ``to`` under a temporary name in DST's folder, then rename
    it into place; with ``check``, only when ``check(temporary path)`` is true. False: nothing was
    written (the temporary output is removed, an existing DST is untouched)."""
    entry = weights_format(to)
    tmp = tmp_path_for(dst)
    try:
        entry.write(sd, spec, tmp, meta)
        if check is not None and not check(tmp):
            return False
        if entry.directory:
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
