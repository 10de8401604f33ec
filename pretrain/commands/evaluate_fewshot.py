"""``vitscale evaluate --fewshot TRAIN_SHARDS VAL_SHARDS``: the few-shot flags, the run and its table."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.train.fewshot_config import FewshotConfig, FewshotDataset


def add_fewshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", default="1,5,10,25", help="comma list of shots per class (default 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="subsets per shot count (default 3)")
    p.add_argument("--l2", default="1024",
                   help="ridge strength, or a comma grid chosen on held-out train images (default 1024)")
    p.add_argument("--holdout", type=int, default=10, help="held-out train images per class for an --l2 grid")
    p.add_argument("--max-train", type=int, default=None, help="use the first N few-shot train images")
    p.add_argument("--max-val", type=int, default=None, help="score a fixed random subset of N val images")
    p.add_argument("--name", default=None, help="dataset name in the results (default: TRAIN_SHARDS' folder name)")


def _numbers(flag: str, text: str, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give a comma list of numbers, e.g. {flag} 1,5,10,25") from None


def fewshot_config(args: argparse.Namespace) -> FewshotConfig:
    """The flags as the ``fewshot`` config section (validated as the config is), its shard sets
    resolved and checked (single-label, labelled)."""
    train, val = args.fewshot
    name = args.name or Path(train.rstrip("/")).name or "data"
    if not args.name:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-") or "data"
    l2 = _numbers("--l2", args.l2, float)
    shots = tuple(_numbers("--shots", args.shots, int))
    try:
        fc = FewshotConfig(datasets=(FewshotDataset(name, train, val),), shots=shots,
                             l2=l2[0] if len(l2) == 1 else tuple(l2), holdout=args.holdout, seeds=args.seeds,
                             max_train=args.max_train, max_val=args.max_val)
    except UserError as err:  # the config's wording, with the flag's name
        text = re.sub(r"^config fewshot\.(\w+)=", lambda m: f"--{m.group(1).replace('_', '-')} ", str(err))
        raise UserError(text.replace("config fewshot.datasets[].name=", "--name ")) from None
    from pretrain.train.fewshot import resolve_dataset

    resolve_dataset(fc.datasets[0])
    return fc


def fewshot_main(args: argparse.Namespace, fc: FewshotConfig, model, img_size: int) -> int:
    from pretrain.train.fewshot import evaluate_model, feature_width, unreadable_line

    result = evaluate_model(model, fc, img_size, args.batch_size, args.workers, args.crop_pct)
    name = fc.datasets[0].name
    short = result.pop("short").get(name, {})
    if short:
        k = max(short)
        print(f"warning: {len(short[k])} classes of {name} have fewer than {k} train images; their {k}-shot sets use "
              f"what there is (lower --shots, or give more train images)", file=sys.stderr)
    if result[f"{name}/unreadable"]:
        print(unreadable_line(name, result[f"{name}/unreadable"]), file=sys.stderr)
    out = {"checkpoint": args.checkpoint, "train": fc.datasets[0].train, "val": fc.datasets[0].val,
           "img_size": img_size, "features": feature_width(model.spec), "seeds": fc.seeds,
           "l2": list(fc.l2_grid) if fc.choose_l2 else fc.l2_grid[0], **result}
    if args.json:
        print(json.dumps(out))
        return 0
    print(format_table(out, name, fc))
    return 0


def format_table(result: dict, name: str, fc: FewshotConfig) -> str:
    head = ["dataset", "classes", "val images", *(f"{k}-shot" for k in fc.shots)]
    row = [name, str(result[f"{name}/classes"]), str(result[f"{name}/val_images"]),
           *(f"{100 * result[f'{name}/{k}shot']:.1f} ± {100 * result[f'{name}/{k}shot_std']:.1f}%" for k in fc.shots)]
    widths = [max(len(a), len(b)) for a, b in zip(head, row, strict=True)]
    l2 = f"l2 chosen from {list(fc.l2_grid)}" if fc.choose_l2 else f"l2 {fc.l2_grid[0]:g}"
    return "\n".join([
        f"few-shot linear accuracy of {result['checkpoint']} ({result['features']}-d features, {result['img_size']}px, "
        f"mean ± std over {fc.seeds} seeds, {l2})",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)),
        f"({result['images']} images through the model; {result['seconds']:.1f} s: features "
        f"{result['feature_seconds']:.1f} s, solve {result['solve_seconds']:.1f} s)",
    ])
