"""``vitscale evaluate --checkpoint PATH --data SHARDS``: top-1/top-5 (or precision@1) of a model.

One process, no DeepSpeed: the model comes from :func:`pretrain.load_model` (any format it
reads); with ``--img-size`` other than the model's, the position embeddings are resampled
(bilinear, the vit_jax way) before evaluating. SHARDS is a folder written by ``vitscale shards
write`` (its ``val`` split, or ``--split train``) or a brace pattern of tars.
"""

from __future__ import annotations

import argparse
import json

import torch

from pretrain.core.errors import UserError


def evaluate_model(model, data: str, img_size: int, split: str = "val", batch_size: int = 64,
                   workers: int = 2, crop_pct: float = 1.0) -> dict:
    from pretrain.data.loader import shard_eval
    from pretrain.data.stream import resolve_shards
    from pretrain.train.config import load_config
    from pretrain.train.losses import correct_counts

    shards = resolve_shards(data, split)
    multi = bool(shards.multi_label)
    num_classes = model.spec.num_classes
    if shards.num_classes and shards.num_classes > num_classes:
        raise UserError(f"{data} holds {shards.num_classes} classes but the model predicts {num_classes}: "
                        f"evaluate it on shards of its own label set")
    cfg = load_config(None, [f"model.num_classes={num_classes}", f"model.img_size={img_size}",
                             f"model.patch_size={model.spec.patch_size}", f"train.micro_batch={batch_size}",
                             f"data.workers={workers}", f"data.multi_label={str(multi).lower()}",
                             f"data.eval_crop_pct={crop_pct}", f"train.loss={'sigmoid' if multi else 'softmax'}"])
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in shard_eval(cfg, 0, 1, spec=data, split=split):
            valid = batch.valid
            logits = model(batch.images[valid])
            for key, val in correct_counts(logits, batch.targets[valid]).items():
                sums[key] = sums.get(key, 0.0) + float(val)
            n += int(valid.sum())
    if n == 0:
        raise UserError(f"{data} ({split} split) yielded no readable samples")
    return {"samples": n, **{k: v / n for k, v in sums.items()}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, .safetensors, ...")
    p.add_argument("--data", required=True, help="shard folder or pattern")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from pretrain import load_model

    model = load_model(args.checkpoint)
    size = args.img_size or model.spec.img_size
    if size != model.spec.img_size:
        model = _resized(model, size)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "img_size": size,
              **evaluate_model(model, args.data, size, args.split, args.batch_size, args.workers, args.crop_pct)}
    if args.json:
        print(json.dumps(result))
    else:
        parts = [f"{k} {100 * result[k]:.2f}%" for k in ("top1", "top5", "prec1") if k in result]
        print(f"{args.checkpoint} on {args.data} ({args.split}, {result['samples']} images, {size}px): "
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
