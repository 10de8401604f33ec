"""``vitscale bench fewshot``: what few-shot evaluation costs.

Two measurements, each printed with the machine it ran on:

* **solver** (feature extraction excluded): a k-shot evaluation of C classes with D-d features
  (default the ViT paper's ImageNet setting at ViT-H width: 10 shots x 1000 classes x 1280-d, 3
  seeds, 10,000 val images): per seed one float64 fit (standardise, Gram matrix ``z^T z``, class
  sums) and the val predictions (one linear solve per l2, scores, argmax), exactly what
  :func:`pretrain.train.fewshot.score` runs on rank 0. The
  features are random class clusters (the cost does not depend on their values). With
  ``--grid G`` every seed also scores G l2 values on ``--holdout`` held-out images per class.
  The median of ``--repeat`` runs is reported.
* **twin** (``--twin``): the whole evaluator on the CPU twin: the model of ``--config``
  (default the ``demo_cpu`` recipe, random weights) on a synthetic few-shot set written to a
  temporary folder by ``vitscale shards synth`` + ``write``: label scan, shot selection, image
  decode + eval transform, forward, float64 solve (:func:`pretrain.train.fewshot.evaluate_model`,
  one process; inside a training run the features are also summed over ranks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.bench.records import machine_info
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.core.system import available_cpus
from pretrain.train import least_squares as lsq


def solver_cost(classes: int, dim: int, shots: int, seeds: int, val: int, grid: int = 0, holdout: int = 10,
                repeat: int = 3) -> dict:
    """Seconds of the float64 solve of a ``shots``-shot evaluation (see the module docstring)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)

    def draw(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(classes), n_per_class)
        return centres[y] + 2.0 * rng.normal(size=(len(y), dim)).astype(np.float32), y

    vy = rng.integers(0, classes, val)
    vx = centres[vy] + 2.0 * rng.normal(size=(val, dim)).astype(np.float32)
    l2s = tuple(2.0 ** np.arange(-4, 2 * grid - 4, 2)) if grid else (1024.0,)
    runs, fits, preds, accs = [], [], [], []
    for _ in range(repeat):
        total = 0.0
        for _seed in range(seeds):
            x, y = draw(shots)
            hx, hy = draw(holdout) if grid else (None, None)
            t0 = time.perf_counter()
            cache = lsq.fit(x, y, classes)
            t1 = time.perf_counter()
            l2 = lsq.choose_l2(cache, hx, hy, l2s) if grid else l2s[0]
            accs.append(lsq.accuracy(cache, vx, vy, l2))
            t2 = time.perf_counter()
            fits.append(t1 - t0)
            preds.append(t2 - t1)
            total += t2 - t0
        runs.append(total)
    return {"classes": classes, "dim": dim, "shots": shots, "seeds": seeds, "val_images": val, "l2_grid": len(l2s),
            "holdout_per_class": holdout if grid else 0, "seconds": statistics.median(runs),
            "fit_seconds_per_seed": statistics.median(fits), "predict_seconds_per_seed": statistics.median(preds),
            "repeats": repeat, "accuracy": float(np.mean(accs)), "torch_threads": torch.get_num_threads()}


def twin_cost(config: str, classes: int, per_class: int, shots: tuple[int, ...], seeds: int, workers: int) -> dict:
    """Seconds of the whole evaluator on the CPU twin (see the module docstring)."""
    from pretrain.model.vit import build_model
    from pretrain.train.config_file import load_config
    from pretrain.train.fewshot import evaluate_model
    from pretrain.train.fewshot_config import FewshotConfig, FewshotDataset

    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="vitscale-bench-fewshot-") as tmp:
        img, out = Path(tmp) / "img", Path(tmp) / "shards"
        for argv in (["synth", str(img), "--classes", str(classes), "--per-class", str(per_class), "--img-size",
                      str(cfg.model.img_size), "--seed", "1"],
                     ["write", str(img), str(out), "--samples-per-shard", "100", "--val-fraction", "0.3",
                      "--workers", "1", "--no-progress"]):
            proc = subprocess.run([sys.executable, "-m", "pretrain", "shards", *argv], capture_output=True, text=True)
            if proc.returncode:
                raise UserError(f"`vitscale shards {argv[0]}` failed for the twin's few-shot set: "
                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        fc = FewshotConfig(datasets=(FewshotDataset("twin", str(out), str(out)),), shots=shots, seeds=seeds)
        model = build_model(cfg.model.spec()).eval()
        result = evaluate_model(model, fc, cfg.model.img_size, cfg.train.micro_batch, workers,
                                cfg.data.eval_crop_pct)
    result.pop("short")
    keep = {k: v for k, v in result.items() if not k.endswith(("_seeds", "_subsets"))}
    keep.update(config=config, model=cfg.model.name, img_size=cfg.model.img_size, classes=classes,
                images_per_class=per_class, workers=workers,
                images_per_s=result["images"] / max(result["feature_seconds"], 1e-9))
    return keep


def format_result(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']} ({result['cpu_count']} CPUs available, torch {m['torch']}, "
             f"{result['solver']['torch_threads']} torch threads)"]
    s = result["solver"]
    grid = (f", l2 chosen from {s['l2_grid']} values on {s['holdout_per_class']} held-out images per class"
            if s["l2_grid"] > 1 else ", one l2")
    lines.append(f"solver: {s['shots']}-shot x {s['classes']} classes x {s['dim']}-d features, {s['seeds']} seeds, "
                 f"{s['val_images']} val images{grid}: {s['seconds']:.2f} s (per seed: fit "
                 f"{s['fit_seconds_per_seed']:.2f} s, predict {s['predict_seconds_per_seed']:.2f} s; median of "
                 f"{s['repeats']}; features excluded)")
    t = result.get("twin")
    if t:
        lines.append(f"twin: {t['model']} {t['img_size']}px on {t['classes']} classes x {t['images_per_class']} "
                     f"synthetic images ({t['config']}): whole evaluation {t['seconds']:.2f} s = features "
                     f"{t['feature_seconds']:.2f} s ({t['images']} images, {t['images_per_s']:.0f} images/s) + solve "
                     f"{t['solve_seconds']:.2f} s + label scan and plan")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale bench fewshot", description=doc_help(__doc__))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1280, help="feature width (1280: ViT-H)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--val", type=int, default=10000, help="val images scored per seed")
    p.add_argument("--grid", type=int, default=0, help="l2 values to choose from (0: one value)")
    p.add_argument("--holdout", type=int, default=10, help="held-out images per class for --grid")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--twin", action="store_true", help="also time the whole evaluator on the CPU twin")
    p.add_argument("--config", default="demo_cpu", help="the twin's recipe (name or YAML file)")
    p.add_argument("--twin-classes", type=int, default=10)
    p.add_argument("--twin-per-class", type=int, default=60)
    p.add_argument("--workers", type=int, default=0, help="decode processes for the twin (0: in process)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for flag, value in (("--classes", args.classes - 1), ("--dim", args.dim), ("--shots", args.shots),
                        ("--seeds", args.seeds), ("--val", args.val), ("--repeat", args.repeat)):
        if value < 1:
            raise UserError(f"{flag}: must be >= {2 if flag == '--classes' else 1}")
    result = {"machine": machine_info(), "cpu_count": available_cpus(),
              "solver": solver_cost(args.classes, args.dim, args.shots, args.seeds, args.val, args.grid, args.holdout,
                                    args.repeat)}
    if args.twin:
        result["twin"] = twin_cost(args.config, args.twin_classes, args.twin_per_class, (1, 5, 10), 3, args.workers)
    print(json.dumps(result) if args.json else format_result(result))
    return 0
