"""How well the training loader mixes a class-sorted shard set: a benchmark that prints figures.

Users' shards are often written in class order (a folder per class, written with webdataset's
``ShardWriter`` in listing order), so the loader's shuffle is what keeps a batch from holding one
class. This script writes such a set with the ``webdataset`` library (``--classes`` x
``--per-class`` tiny JPEGs, ``--per-shard`` samples per shard, class after class), draws
``--steps`` global batches of ``--global-batch`` through the real ``ShardTrain`` on ``--ranks``
ranks x ``--workers`` workers (data section defaults otherwise: ``data.shuffle_buffer`` 2000),
and reports, per global batch:

* ``same_label_pair_share``: the share of sample pairs in the batch with the same label; for a
  perfectly shuffled stream it is about ``ideal`` = sum over classes of p_c^2 (1 / classes here);
  ``ratio`` = measured / ideal (1.0 is perfect; 10 means batches are ten times as clumped);
* ``labels_per_batch``: distinct labels in a batch;
* ``first_batch_s``: seconds until the first batch arrived (shuffle buffers fill first).

It uses only ``ShardTrain`` and ``load_config``, so the same script measures another checkout of
vitscale (``PYTHONPATH=that/checkout python bench/shuffle_mixing.py``): that is how the README's
before/after figures were made.

    python bench/shuffle_mixing.py --json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_class_sorted(out: Path, classes: int, per_class: int, per_shard: int) -> str:
    """A shard set in class order, written by webdataset's ShardWriter; returns its brace pattern."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "sorted-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for c in range(classes):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
                sink.write({"__key__": f"c{c:04d}_{i:05d}", "jpg": buf.getvalue(), "cls": str(c).encode()})
    n = len(list(out.glob("sorted-*.tar")))
    return str(out / f"sorted-{{000000..{n - 1:06d}}}.tar")


def measure(pattern: str, classes: int, ranks: int, workers: int, global_batch: int, steps: int) -> dict:
    from pretrain.data.loader import ShardTrain
    from pretrain.train.config_file import load_config

    micro = global_batch // ranks
    cfg = load_config(None, ["model.name=vit_test4", "model.img_size=16", f"model.num_classes={classes}",
                             f"data.train={pattern}", f"data.workers={workers}", f"train.micro_batch={micro}"])
    spec = cfg.loader()
    if "grad_accum" in {f.name for f in dataclasses.fields(spec)}:
        spec = dataclasses.replace(spec, grad_accum=1)
    t0 = time.monotonic()
    sources = [ShardTrain(spec, r, ranks) for r in range(ranks)]
    shares, distinct, first = [], [], None
    for _ in range(steps):
        labels = np.concatenate([s.next_batch().targets.numpy() for s in sources])
        first = first if first is not None else time.monotonic() - t0
        _, counts = np.unique(labels, return_counts=True)
        n = len(labels)
        shares.append(float((counts * (counts - 1)).sum() / (n * (n - 1))))
        distinct.append(len(counts))
    for s in sources:
        s.close()
    ideal = 1.0 / classes
    share = float(np.mean(shares))
    return {"ranks": ranks, "workers": workers, "global_batch": global_batch, "steps": steps,
            "same_label_pair_share": round(share, 5), "ideal": round(ideal, 5), "ratio": round(share / ideal, 2),
            "labels_per_batch": round(float(np.mean(distinct)), 1), "first_batch_s": round(first, 2),
            "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layouts", default="1x1,1x2,2x1,2x2", help="RANKSxWORKERS, comma separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_class_sorted(Path(tmp) / "sorted", args.classes, args.per_class, args.per_shard)
        runs = []
        for layout in args.layouts.split(","):
            ranks, workers = (int(x) for x in layout.split("x"))
            runs.append(measure(pattern, args.classes, ranks, workers, args.global_batch, args.steps))
            if not args.json:
                print(json.dumps(runs[-1]), flush=True)
    import pretrain

    out = {"benchmark": "shuffle_mixing", "machine": f"{platform.processor() or platform.machine()}, "
           f"{len(__import__('os').sched_getaffinity(0))} cores, python {platform.python_version()}",
           "vitscale": str(Path(pretrain.__file__).resolve().parents[1]), "classes": args.classes,
           "samples": args.classes * args.per_class, "per_shard": args.per_shard, "runs": runs}
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
