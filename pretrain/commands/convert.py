"""``vitscale convert SRC DST --to FMT``: checkpoint conversion, verified by logits.

    vitscale convert RUN_DIR weights.safetensors --to safetensors          # ZeRO (any stage/world) -> ours
    vitscale convert RUN_DIR RUN_DIR/checkpoints/universal_step_00000100 --to deepspeed-universal
    vitscale convert ViT-B_16.npz vit_b16.safetensors --to safetensors --verify
    vitscale convert weights.safetensors hf_dir --to hf --verify
    vitscale convert weights.safetensors vit.pth --to timm --drop-head
    vitscale convert RUN_DIR ema.safetensors --to safetensors --ema         # the run's EMA weights
    vitscale convert epoch_32.pt clip_tower.safetensors --to safetensors --verify   # OpenCLIP image tower

The formats, their detection, readers, writers and oracles are the entries of
:data:`pretrain.formats.registry.REGISTRY`. The source format is detected
(:func:`pretrain.formats.detect_format`) or given with ``--from``; the conversion itself is
:mod:`pretrain.formats.convert`. ``deepspeed-universal`` needs a ZeRO checkpoint as source and
wraps DeepSpeed's ``ds_to_universal``.

Safety: an existing DST is never replaced without ``--force``; with it, a DST directory is only
replaced when it is itself a checkpoint of the target format. Outputs are written under a
temporary name and renamed into place.

``--verify`` checks the output under its temporary name before it is moved into place, on a
fixed seeded batch, against every oracle at hand (:func:`pretrain.formats.convert.verify`): DST
read back by vitscale (every missing / extra / mis-shaped key listed), the output library's own
model (the registry entry's oracle: transformers for ``hf``, timm for ``timm``, open_clip for
``openclip``) and the source library's own model (transformers for a HF folder, timm for a timm
file or Hub folder, open_clip for an OpenCLIP file or Hub folder), each named with its version.
When a max |diff| exceeds ``--atol`` (1e-4) or a key does not map, nothing is written (an
existing DST is untouched), the last line says the max |diff| and the tolerance, and the exit
status is 1.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from pretrain.checkpoint.universal import to_universal
from pretrain.core.errors import UserError
from pretrain.formats.convert import (
    Source,
    check_dst,
    remove,
    replace_dir,
    tmp_path_for,
    verify,
    write_converted,
)
from pretrain.formats.deepspeed_ckpt import consolidate_deepspeed, resolve_deepspeed_checkpoint
from pretrain.formats.registry import detect_format, format_names, read_weights, weights_format, writable_names
from pretrain.formats.state_dict import DTYPES, StateDict, cast, drop_head, require_spec
from pretrain.model.vit import ViTSpec


def _parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    p = argparse.ArgumentParser(prog="vitscale convert", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Convert a ViT checkpoint between formats (SRC's format is "
                                            "detected), optionally verified by logits.",
                                epilog="examples:\n" + examples)
    p.add_argument("src", type=Path, help="source checkpoint (file or directory)")
    p.add_argument("dst", type=Path, help="output file or directory")
    p.add_argument("--to", required=True, choices=writable_names(), help="output format")
    p.add_argument("--from", dest="src_format", choices=format_names(), help="source format (detected by default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="output dtype (npz is always fp32)")
    p.add_argument("--heads", type=int, help="attention heads, for sources that do not store them (.pth)")
    p.add_argument("--drop-head", action="store_true", help="write the backbone only (no pre_logits / head)")
    p.add_argument("--verify", action="store_true", help="compare source and output logits (exit 1 if off)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit diff| --verify accepts")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--ema", action="store_true",
                   help="export the EMA weights of a vitscale training checkpoint (runs with ema.decay)")
    return p


def _summary(sd: StateDict, spec: ViTSpec) -> str:
    n = sum(v.numel() for v in sd.values())
    dtypes = ", ".join(sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}))
    return (f"{len(sd)} tensors, {n:,} parameters, {dtypes}; width {spec.width}, depth {spec.depth}, heads "
            f"{spec.heads}, patch {spec.patch_size}, image {spec.img_size}, pool {spec.pool}, pre-logits "
            f"{spec.representation_size or '-'}, classes {spec.num_classes}, LayerNorm eps {spec.norm_eps:g}")


def _print_meta_notes(meta: dict) -> None:
    for w in meta.get("warnings", []):
        print(f"warning: {w}")
    for k in meta.get("unmapped", []):
        print(f"note: source tensor {k} has no place in vitscale's ViT and was dropped")


def _convert_universal(args: argparse.Namespace) -> int:
    fmt = args.src_format or detect_format(args.src)
    if fmt != weights_format(args.to).written_from:
        raise UserError(f"--to deepspeed-universal needs a DeepSpeed ZeRO checkpoint as SRC; {args.src} "
                        f"is {fmt!r}")
    if args.dst.name.startswith("step_") and (args.dst.parent / "latest").is_file():
        print(f"warning: {args.dst.name} looks like a training tag; the run's keep-last-K pruning may "
              f"delete it. Prefer a name such as universal_{args.dst.name}")
    if args.drop_head or args.dtype != "fp32":
        raise UserError("--drop-head and --dtype do not apply to --to deepspeed-universal: a universal "
                        "checkpoint holds the fp32 master weights and optimizer state of the whole model, "
                        "for resuming")
    if args.verify:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd, spec, _ = consolidate_deepspeed(args.src)
        spec = require_spec(spec, sd, str(args.src))
    tmp = tmp_path_for(args.dst)
    try:
        ckdir, tag = resolve_deepspeed_checkpoint(args.src)
        to_universal(ckdir / tag, tmp)
        if args.verify:
            report = verify(sd, spec, tmp, "deepspeed-universal", heads=args.heads, atol=args.atol)
            print("\n".join(report.lines() + [report.verdict(args.dst)]))
            if not report.ok:
                return 1
        replace_dir(tmp, args.dst)
    finally:
        remove(tmp)
    (args.dst.parent / "latest_universal").write_text(args.dst.name)
    print(f"wrote {args.dst} (DeepSpeed universal checkpoint); to resume with any world size set DeepSpeed "
          f"\"checkpoint\": {{\"load_universal\": true}} and load from {args.dst.parent} "
          f"(its latest_universal names {args.dst.name})")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.atol >= 0:
        raise UserError(f"--atol {args.atol}: the tolerance must be a number >= 0 (default 1e-4)")
    if not args.src.exists():
        raise UserError(f"{args.src} does not exist")
    check_dst(args.src, args.dst, args.to, args.force)
    target = weights_format(args.to)
    if target.write is None:
        return _convert_universal(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, spec, meta = read_weights(args.src, args.src_format, heads=args.heads, ema=args.ema)
    _print_meta_notes(meta)
    spec = require_spec(spec, sd, str(args.src))
    print(f"read {args.src} ({meta['format']}): {_summary(sd, spec)}")
    source = Source(args.src, meta["format"], sd, spec) if args.verify else None
    if args.drop_head:
        sd, spec = drop_head(sd, spec)
    sd = cast(sd, DTYPES[args.dtype])
    if args.to == "npz" and args.dtype != "fp32":
        print("note: .npz is written in float32 (numpy has no bfloat16), holding the bf16-rounded values")
    if target.unrecorded_eps is not None and spec.norm_eps != target.unrecorded_eps[1]:
        readers, eps = target.unrecorded_eps
        print(f"warning: {args.to} files do not record the LayerNorm epsilon and {readers} the ViT with {eps:g}; "
              f"this model uses {spec.norm_eps:g}, so its outputs there differ slightly (--verify measures by "
              f"how much). --to safetensors and --to hf keep it")

    def check(tmp: Path) -> bool:
        report = verify(sd, spec, tmp, args.to, source=source, heads=args.heads, atol=args.atol)
        print("\n".join(report.lines() + [report.verdict(args.dst)]))
        return report.ok

    if not write_converted(sd, spec, args.dst, args.to, meta, check if args.verify else None):
        return 1
    kind = target.output_kind(spec) if target.output_kind else args.to
    print(f"wrote {args.dst} ({kind}): {_summary(sd, spec)}")
    return 0
