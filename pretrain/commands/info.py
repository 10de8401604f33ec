"""``vitscale info --model NAME``: what a variant costs, computed on the meta device."""

from __future__ import annotations

import argparse
import json

from pretrain.core.help_text import doc_help
from pretrain.model.costs import mixed_peak, model_costs, peak_flops_for
from pretrain.model.vit import variant_names


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale info", description=doc_help(__doc__))
    p.add_argument("--model", required=True, help=f"variant name, e.g. {', '.join(variant_names()[:4])} ...")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--pre-logits", action="store_true", help="include the pretraining pre-logits layer")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from pretrain.train.config import ModelConfig

    mc = ModelConfig(name=args.model, img_size=args.img_size, num_classes=args.num_classes,
                     representation_size="auto" if args.pre_logits else None)
    spec = mc.spec()
    info = {"model": args.model, "img_size": args.img_size, "patch_size": spec.patch_size, "width": spec.width,
            "depth": spec.depth, "heads": spec.heads, "norm_eps": spec.norm_eps, "num_classes": args.num_classes,
            **model_costs(spec)}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.model} @ {args.img_size}px: width {spec.width}, depth {spec.depth}, heads {spec.heads}, "
          f"patch {spec.patch_size}, LayerNorm eps {spec.norm_eps:g}")
    print(f"  params            {info['params'] / 1e6:.1f}M (backbone {info['params_backbone'] / 1e6:.1f}M)")
    print(f"  forward           {info['gmacs_fwd']:.1f} GMACs / image")
    print(f"  training          {info['train_tflops_per_image']:.3f} TFLOPs / image (6 x forward MACs)")
    h100 = peak_flops_for("H100")
    print(f"  model.fp8         {info['fp8_flops_share']:.1%} of them in the blocks' Linear layers, which run in FP8 "
          f"with model.fp8 (same FLOPs); MFU's peak then mixes FP8 and bf16: H100 "
          f"{mixed_peak(h100, info['fp8_flops_share']) / 1e12:.0f} instead of {h100 / 1e12:.0f} TFLOP/s")
    print(f"  sequence length   {info['seq_len']}, head_dim {info['head_dim']}")
    return 0
