"""The weights-format registry: one table that detection, reading, writing, ``vitscale convert``,
``vitscale inspect`` and ``--verify`` all go through.

A format is one module in ``pretrain/formats/`` (its layout, reader, writer, detector and, where
the source framework can be imported, its oracle) plus one :class:`WeightsFormat` entry in
:data:`REGISTRY`. Nothing else names formats: the commands' ``--from`` / ``--to`` choices, the
detection order, the EMA switch, ``inspect``'s header-only descriptions and the oracles of
``--verify`` are read off the entries.

Detection asks the entries in :data:`REGISTRY` order and takes the first that claims the path; the
order is the priority (each detector may assume the ones before it said no):

=====================  ====================================================================
safetensors            ``*.safetensors`` whose metadata says ``format: vitscale``
deepspeed              a tag directory, or a checkpoints / run directory whose first pointer is
                       ``latest``
deepspeed-universal    ``zero/`` + ``*model_states.pt``, or a directory whose first pointer is
                       ``latest_universal`` naming one
npz                    ``*.npz``
openclip               an OpenCLIP Hub folder (``open_clip_config.json``), or a weights file with a
                       CLIP model's ``visual.*`` keys or an OpenCLIP image tower's
hf                     a folder whose config.json names a ``model_type``, or its
                       ``model*.safetensors`` / ``pytorch_model.bin``
timm                   a timm Hub folder, and every other ``.safetensors`` / ``.pth`` / ``.pt`` /
                       ``.bin`` (last: it claims what no other format did)
=====================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.core.errors import UserError
from pretrain.formats import deepspeed_ckpt, hf, npz, openclip, ours, timm
from pretrain.formats.state_dict import StateDict, check_state_dict, dtype_names, infer_spec
from pretrain.model.vit import VisionTransformer, ViTSpec

Reading = tuple[StateDict, ViTSpec | None, dict]
Compare = Callable[[Path, ViTSpec, VisionTransformer, torch.Tensor], tuple[str, float]]


@dataclass(frozen=True)
class Oracle:
    """The source framework's own model, which ``--verify`` compares ours with.

    ``compare(path, spec, ours, x)`` loads the file at ``path`` with the framework's own loader and
    returns (what was compared, with the framework's version; max |diff| against ``ours`` on
    ``x``). ``library`` is imported first: when it is missing the check is skipped with a note.
    ``cannot(spec)`` says why the framework cannot hold ``spec`` (then skipped with that note)."""

    library: str
    compare: Compare
    cannot: Callable[[ViTSpec], str | None] = lambda spec: None


@dataclass(frozen=True)
class WeightsFormat:
    """One weights format: how to recognise, read, write, describe and check it.

    ``detect(path)``: this format's file or folder (cheap: names, headers, metadata); may assume the
    entries before it in :data:`REGISTRY` said no. ``read(path, heads)`` -> (state dict in
    :mod:`pretrain.model.vit`'s keys, spec or None when the file does not tell it, meta); ``heads``
    is the user's ``--heads`` for formats that do not store it. ``write(sd, spec, path, meta)``
    writes a conversion's output (None: not a target for a state dict); its outputs are files
    named ``*{suffixes}``, or a directory when ``directory``. ``describe(path)``: what ``inspect``
    shows without loading tensors (None: the weights are read). ``read_ema``: the EMA weights
    instead (training checkpoints). ``replaceable(path)``: what ``--force`` may replace with an
    output (default ``detect``). ``unrecorded_eps``: (who builds the model from these files, the
    epsilon they use) when the files do not record the LayerNorm epsilon. ``written_from``: a
    target written from a source checkpoint of that format as it is, not from a state dict.
    ``output_kind(spec)``: the name of what ``write`` wrote, for convert's last line."""

    name: str
    summary: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, int | None], Reading]
    write: Callable[[StateDict, ViTSpec, Path, dict], None] | None = None
    suffixes: tuple[str, ...] = ()
    directory: bool = False
    oracle: Oracle | None = None
    describe: Callable[[Path], dict] | None = None
    read_ema: Callable[[Path, int | None], Reading] | None = None
    replaceable: Callable[[Path], bool] | None = None
    unrecorded_eps: tuple[str, float] | None = None
    written_from: str | None = None
    output_kind: Callable[[ViTSpec], str] | None = None

    @property
    def writable(self) -> bool:
        return self.write is not None or self.written_from is not None


REGISTRY: dict[str, WeightsFormat] = {f.name: f for f in (
    WeightsFormat(
        "safetensors", "vitscale's consolidated safetensors, spec in its metadata",
        detect=ours.is_ours, read=lambda p, heads: ours.load_safetensors(p), write=ours.write_ours,
        suffixes=(".safetensors",), describe=ours.describe_safetensors, replaceable=Path.is_file),
    WeightsFormat(
        "deepspeed", "vitscale's DeepSpeed ZeRO training checkpoint (run, checkpoints or tag directory)",
        detect=deepspeed_ckpt.is_zero_checkpoint, read=lambda p, heads: deepspeed_ckpt.consolidate_deepspeed(p),
        read_ema=lambda p, heads: deepspeed_ckpt.consolidate_ema(p), describe=deepspeed_ckpt.describe_zero),
    WeightsFormat(
        "deepspeed-universal", "DeepSpeed universal checkpoint",
        detect=deepspeed_ckpt.is_universal_checkpoint, read=lambda p, heads: deepspeed_ckpt.read_universal(p),
        written_from="deepspeed", directory=True, describe=deepspeed_ckpt.describe_universal,
        replaceable=deepspeed_ckpt.is_universal_dir),
    WeightsFormat(
        "npz", "Google vit_jax / big_vision .npz (written as vit_jax)",
        detect=npz.is_npz, read=npz.read_npz, write=npz.write_vit_jax_npz, suffixes=(".npz",),
        replaceable=Path.is_file, unrecorded_eps=("vit_jax and big_vision build", 1e-6)),
    WeightsFormat(
        "openclip", "OpenCLIP ViT image tower: a CLIP state dict (visual.*) or an open_clip Hub folder",
        detect=openclip.is_openclip, read=openclip.read_openclip, write=openclip.write_openclip,
        suffixes=(".safetensors",), oracle=Oracle("open_clip", openclip.openclip_oracle), replaceable=Path.is_file),
    WeightsFormat(
        "hf", "HF transformers ViT directory",
        detect=hf.is_hf, read=lambda p, heads: hf.read_hf(p), write=hf.write_hf, directory=True,
        oracle=Oracle("transformers", hf.hf_oracle), replaceable=hf.is_hf_dir,
        output_kind=lambda spec: f"hf, {hf.hf_architecture(spec)}"),
    WeightsFormat(
        "timm", "timm VisionTransformer state dict (.pth or .safetensors) or timm Hub folder",
        detect=timm.is_timm, read=timm.read_timm, write=timm.write_timm, suffixes=timm.WEIGHT_SUFFIXES,
        oracle=Oracle("timm", timm.timm_oracle, timm.timm_cannot_hold), replaceable=Path.is_file,
        unrecorded_eps=("timm builds", 1e-6)),
)}


def format_names() -> list[str]:
    """Every registered format, in detection order."""
    return list(REGISTRY)


def writable_names() -> list[str]:
    """The formats ``vitscale convert --to`` writes."""
    return [f.name for f in REGISTRY.values() if f.writable]


def weights_format(name: str) -> WeightsFormat:
    """The entry of ``name``; :class:`UserError` naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise UserError(f"unknown format {name!r}; use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def detect_format(path: str | Path) -> str:
    """The name of the first entry of :data:`REGISTRY` that claims ``path``; :class:`UserError`
    when it does not exist or none does."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    for fmt in REGISTRY.values():
        if fmt.detect(p):
            return fmt.name
    known = "; ".join(f"{f.name}: {f.summary}" for f in REGISTRY.values())
    if p.is_dir():
        raise UserError(f"{p} is a directory vitscale does not recognise: expected one of {known}")
    raise UserError(f"cannot tell the format of {p} from its name; pass --from with one of "
                    f"{', '.join(REGISTRY)} ({known})")


def read_weights(path: str | Path, fmt: str | None = None, *, heads: int | None = None,
                 ema: bool = False) -> Reading:
    """(state dict in our keys, spec, meta) of any registered format, on CPU.

    ``fmt``: a registered name, detected when None. ``heads`` fills in the head count for formats
    that do not store it (timm ``.pth``); without it the known-variant table by width is used, and
    the spec is None only when neither knows. Tensors keep their stored dtype (fp32 master weights
    for DeepSpeed). ``meta`` always has ``format``, ``source`` and ``dtype``, and may have ``step``,
    ``world_size``, ``zero_stage``, ``config``, ``warnings`` (also raised as Python warnings) and
    ``unmapped`` (source keys dropped on purpose, e.g. HF ``mask_token``). When the spec is known the
    state dict has been checked against it. ``ema``: the EMA weights of a training checkpoint
    instead of its trained weights (formats with ``read_ema``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    entry = weights_format(fmt or detect_format(path))
    if ema and entry.read_ema is None:
        raise UserError(f"{path} is {entry.name!r}: EMA weights are read from a vitscale training checkpoint (a run "
                        f"or checkpoint directory); a converted file holds one set of weights")
    sd, spec, meta = (entry.read_ema if ema else entry.read)(path, heads)
    spec = spec or infer_spec(sd, heads, str(path))
    if spec is not None:
        check_state_dict(sd, spec, str(path))
    meta = {**meta, "format": entry.name, "source": str(path), "dtype": ", ".join(dtype_names(sd))}
    return sd, spec, meta

