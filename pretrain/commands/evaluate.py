"""``vitscale evaluate --checkpoint PATH --data SHARDS``: top-1/top-5 (or precision@1) of a model;
``--fewshot TRAIN_SHARDS VAL_SHARDS [--shots 1,5,10,25]``: its few-shot linear accuracy instead
(:mod:`pretrain.train.fewshot`, the metric ``fewshot.*`` logs during training), as a table or
``--json``.

One process, no DeepSpeed: the model comes from :func:`pretrain.load_model` (any format it
reads); with ``--img-size`` other than the model's, the position embeddings are resampled
(bilinear, the vit_jax way) before evaluating. SHARDS is any shard set the loaders take (see
:mod:`pretrain.data.shards`): a folder written by ``vitscale shards write`` (its ``val`` split,
or ``--split train``; a folder holding one split serves either), a pattern, a glob or a list.
The result says how many images were scored of how many the set holds; a shortfall (unreadable
samples) is a warning naming the shards.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pretrain.commands.evaluate_fewshot import add_fewshot_args, fewshot_config, fewshot_main
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.data.config import DataConfig, LoaderSpec
from pretrain.data.loader import ShardEval
from pretrain.data.transforms import normalize
from pretrain.train.losses import correct_counts


def evaluate_model(model, data: str, img_size: int, split: str = "val", batch_size: int = 64,
                   workers: int = 2, crop_pct: float = 1.0) -> dict:
    """Metrics of ``model`` (eval mode, CPU) on the ``split`` of ``data``: ``samples`` scored,
    ``expected`` (what the set holds), ``unusable`` by shard, and top1/top5 or prec1."""
    from pretrain.data.shard_sets import resolve_shards

    multi = bool(resolve_shards(data, split, key="--data").multi_label)
    spec = LoaderSpec(DataConfig(train="synthetic", val=data, workers=workers, multi_label=multi,
                                 eval_crop_pct=crop_pct), batch_size, img_size, model.spec.num_classes, seed=0)
    source = ShardEval(spec, 0, 1, data, split, key="--data")
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in source:
            valid = batch.valid
            if not valid.any():
                continue
            logits = model(normalize(batch.images[valid]))
            for key, val in correct_counts(logits, batch.targets[valid]).items():
                sums[key] = sums.get(key, 0.0) + float(val)
            n += int(valid.sum())
    if n == 0:
        raise UserError(f"--data {data} ({split} split) yielded no readable samples; check it with "
                        f"`vitscale shards verify`")
    unusable: dict[str, int] = {}
    for (_, shard), k in source.bad.items():
        unusable[shard] = unusable.get(shard, 0) + k
    return {"samples": n, "expected": source.expected, "unusable": unusable,
            **{k: v / n for k, v in sums.items()}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale evaluate", description=doc_help(__doc__))
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, .safetensors, ...")
    p.add_argument("--data", help="shard folder, pattern, glob or comma list")
    p.add_argument("--fewshot", nargs=2, metavar=("TRAIN_SHARDS", "VAL_SHARDS"),
                   help="few-shot linear accuracy: shots from TRAIN_SHARDS, accuracy on VAL_SHARDS")
    add_fewshot_args(p)
    p.add_argument("--split", default="val", help="split of an indexed folder (default val)")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if (args.data is None) == (args.fewshot is None):
        raise UserError("give --data SHARDS (top-1) or --fewshot TRAIN_SHARDS VAL_SHARDS "
                        "(few-shot linear accuracy)")
    for flag, value in (("--batch-size", args.batch_size), ("--img-size", args.img_size or 1)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0")
    if not 0 < args.crop_pct <= 1:
        raise UserError(f"--crop-pct {args.crop_pct}: must be in (0, 1]")
    fewshot = fewshot_config(args) if args.fewshot else None  # flags and shard sets checked before loading
    from pretrain.formats.load import load_model

    model = load_model(args.checkpoint, ema=args.ema)
    size = args.img_size or model.spec.img_size
    if size != model.spec.img_size:
        model = _resized(model, size)
    if args.fewshot:
        return fewshot_main(args, fewshot, model, size)
    result = {"checkpoint": args.checkpoint, "weights": "ema" if args.ema else "model", "data": args.data,
              "split": args.split, "img_size": size,
              **evaluate_model(model, args.data, size, args.split, args.batch_size, args.workers, args.crop_pct)}
    short = result["expected"] is not None and result["samples"] < result["expected"]
    if short:
        worst = ", ".join(f"{s} ({k})" for s, k in sorted(result["unusable"].items(), key=lambda kv: -kv[1])[:5])
        print(f"warning: scored {result['samples']} of the {result['expected']} images in {args.data}; unusable "
              f"samples in {worst or 'unknown shards'}; check them with `vitscale shards verify`", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        parts = [f"{k} {100 * result[k]:.2f}%" for k in ("top1", "top5", "prec1") if k in result]
        of = f" of {result['expected']}" if result["expected"] is not None else ""
        print(f"{args.checkpoint} on {args.data} ({args.split}, {result['samples']}{of} images, {size}px): "
              + "  ".join(parts))
    return 0


def _resized(model, size: int):
    from dataclasses import replace

    from pretrain.model.surgery import resample_state_dict
    from pretrain.model.vit import build_model

    spec = replace(model.spec, img_size=size)
    if size % spec.patch_size:
        raise UserError(f"--img-size {size} is not a multiple of the patch size {spec.patch_size}")
    sd, _ = resample_state_dict(model.state_dict(), spec)
    out = build_model(spec)
    out.load_state_dict(sd)
    return out.eval()
