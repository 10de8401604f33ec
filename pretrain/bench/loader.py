"""``vitscale bench loader``: images/s of the CPU decode + augmentation, ours vs the plain path.

Reads the train shards listed in ``OUT/index.json`` in a torch DataLoader with W worker
processes (each worker takes every W-th shard, or every W-th sample when there are fewer shards
than workers), loops over them as many times as needed, and times
:func:`pretrain.data.transforms.train_transform` against :func:`pretrain.data.transforms.baseline_transform`
(full decode, crop, resize) in the same run. The two alternate in rounds (ours, baseline, ours,
...) with a fresh DataLoader each, so a change in machine load hits both alike. Per round the
first ``(prefetch + 1) x W`` batches are warm-up (worker start, initial prefetch burst).

Two rates are reported per transform:

* ``images_per_s``: wall clock, all workers together, what the training loop would see;
* ``images_per_s_per_core``: images per CPU-second spent in the workers (each worker reports
  its own ``time.process_time``), i.e. what one dedicated core sustains. It does not move when
  other processes share the machine, so it is the figure to plan core counts with;
  ``images_per_s_per_worker`` (wall / W) is given too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from collections.abc import Iterator
from pathlib import Path

import PIL
import torch
from PIL import features
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.core.errors import UserError
from pretrain.core.system import available_cpus
from pretrain.data.shards import iter_tar_samples, load_index
from pretrain.data.transforms import baseline_transform, train_transform

TRANSFORMS = {"ours": train_transform, "baseline": baseline_transform}
_PREFETCH = 2
_ROUNDS = 3
# Images/s one H100 consumes at ~50% MFU of 989 TFLOP/s: ~1.0 TFLOP per ViT-H/14 image, ~0.1 for ViT-B/16.
TARGETS = {"ViT-H/14 on one H100": 500, "ViT-B/16 on one H100": 5000}


class ShardImages(IterableDataset):
    """Endless ``(uint8 (3, S, S) image, label, worker id, worker CPU seconds)`` from tar shards."""

    def __init__(self, files: list[str], transform: str, img_size: int, seed: int = 0) -> None:
        self.files, self.transform, self.img_size, self.seed = files, transform, img_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int, float]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        by_shard = len(self.files) >= workers
        files = self.files[worker::workers] if by_shard else self.files
        transform = TRANSFORMS[self.transform]
        rng = random.Random(self.seed * 1009 + worker)
        while True:
            position = 0
            for path in files:
                for sample in iter_tar_samples(Path(path)):
                    position += 1
                    if not by_shard and (position - 1) % workers != worker:
                        continue
                    image = sample.image()
                    if image is None:
                        continue
                    label = int(sample.files["cls"]) if "cls" in sample.files else -1
                    yield transform(image[1], self.img_size, rng), label, worker, time.process_time()


def timed_round(files: list[str], transform: str, workers: int, img_size: int, batch_size: int,
                batches: int | None, seconds: float, seed: int = 0) -> dict:
    """One round with a fresh DataLoader: ``batches`` timed batches, or as many as fit in ``seconds``.

    Returns images, wall seconds, and the images/CPU-seconds measured between each worker's first
    and last timed batch (a worker's first timed batch only marks its starting CPU time).
    """
    loader = DataLoader(ShardImages(files, transform, img_size, seed), batch_size=batch_size,
                        num_workers=workers, prefetch_factor=_PREFETCH if workers > 0 else None)
    stream = iter(loader)
    for _ in range((_PREFETCH + 1) * max(1, workers)):
        next(stream)
    images = timed = 0
    cpu_first: dict[int, float] = {}
    cpu_last: dict[int, float] = {}
    cpu_images: dict[int, int] = {}
    start = time.perf_counter()
    while True:
        batch, _, worker_ids, cpu = next(stream)
        worker, now = int(worker_ids[0]), float(cpu.max())
        if worker in cpu_first:
            cpu_last[worker] = now
            cpu_images[worker] = cpu_images.get(worker, 0) + batch.shape[0]
        else:
            cpu_first[worker] = now
        images += batch.shape[0]
        timed += 1
        elapsed = time.perf_counter() - start
        if (batches is not None and timed >= batches) or (batches is None and elapsed >= seconds):
            break
    del stream
    cpu_seconds = sum(cpu_last[w] - cpu_first[w] for w in cpu_last)
    return {"images": images, "batches": timed, "seconds": elapsed,
            "cpu_images": sum(cpu_images.values()), "cpu_seconds": cpu_seconds}


def _summarise(rounds: list[dict], workers: int) -> dict:
    images = sum(r["images"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu_images = sum(r["cpu_images"] for r in rounds)
    cpu_seconds = sum(r["cpu_seconds"] for r in rounds)
    rate = images / seconds
    per_core = cpu_images / cpu_seconds if cpu_seconds > 0 else rate / max(1, workers)
    return {"images": images, "batches": sum(r["batches"] for r in rounds), "seconds": round(seconds, 3),
            "images_per_s": round(rate, 1), "images_per_s_per_core": round(per_core, 1),
            "images_per_s_per_worker": round(rate / max(1, workers), 1),
            "round_images_per_s": [round(r["images"] / r["seconds"], 1) for r in rounds]}


def machine_info() -> dict:
    """CPU model, core counts and library versions, for reading the figures later."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cores": available_cpus(),
            "torch": torch.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo"))}


def cores_needed(per_core: float) -> dict[str, int | None]:
    return {name: (math.ceil(rate / per_core) if per_core > 0 else None) for name, rate in TARGETS.items()}


def run_benchmark(out: Path, workers: int, img_size: int, batch_size: int, batches: int | None,
                  seconds: float) -> dict:
    """Benchmark both transforms on the train shards of ``out``; the JSON document of ``--json``."""
    index = load_index(out)
    shards = index["splits"].get("train", {}).get("shards", [])
    files = [str(out / s["file"]) for s in shards if s.get("samples", 0) > 0]
    if not files:
        raise UserError(f"{out / 'index.json'} lists no non-empty train shards; write some with "
                        "`vitscale shards write SRC OUT`.")
    rounds: dict[str, list[dict]] = {"ours": [], "baseline": []}
    count = 1 if batches is not None else _ROUNDS
    for i in range(count):
        for name in rounds:
            rounds[name].append(timed_round(files, name, workers, img_size, batch_size, batches,
                                            seconds / count, seed=i))
    ours, base = _summarise(rounds["ours"], workers), _summarise(rounds["baseline"], workers)
    return {
        "images_per_s": ours["images_per_s"],
        "images_per_s_per_core": ours["images_per_s_per_core"],
        "baseline_images_per_s": base["images_per_s"],
        "baseline_images_per_s_per_core": base["images_per_s_per_core"],
        "speedup_vs_baseline": round(ours["images_per_s"] / base["images_per_s"], 3),
        "speedup_per_core_vs_baseline": round(ours["images_per_s_per_core"] / base["images_per_s_per_core"],
                                              3),
        "workers": workers,
        "img_size": img_size,
        "batch_size": batch_size,
        "shards": len(files),
        "samples": sum(s["samples"] for s in shards),
        "runs": {"ours": ours, "baseline": base},
        "cores_needed": cores_needed(ours["images_per_s_per_core"]),
        "machine": machine_info(),
    }


def format_result(r: dict) -> str:
    """The human summary of :func:`run_benchmark`."""
    m, ours, base = r["machine"], r["runs"]["ours"], r["runs"]["baseline"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable of {m['cpu_count']} cores, torch {m['torch']}, "
        f"Pillow {m['pillow']} (libjpeg-turbo: {m['libjpeg_turbo']})",
        f"data: {r['samples']} samples in {r['shards']} train shards, img_size {r['img_size']}, "
        f"batch {r['batch_size']}, {r['workers']} workers",
        f"{'':32}{'img/s (wall)':>14}{'img/s/worker':>14}{'img/s per core (CPU time)':>28}",
    ]
    for title, run in (("train_transform (draft decode)", ours), ("baseline (full decode)", base)):
        lines.append(f"{title:32}{run['images_per_s']:>14.1f}{run['images_per_s_per_worker']:>14.1f}"
                     f"{run['images_per_s_per_core']:>28.1f}")
    lines.append(f"speedup vs baseline: {r['speedup_vs_baseline']:.2f}x wall, "
                 f"{r['speedup_per_core_vs_baseline']:.2f}x per core")
    needs = ", ".join(f"{TARGETS[k]} img/s ({k}): {v} cores" for k, v in r["cores_needed"].items())
    lines.append(f"cores needed at our per-core rate: {needs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``vitscale bench loader --shards OUT [--workers W] [--img-size S] [--batches N] [--json]``."""
    parser = argparse.ArgumentParser(prog="vitscale bench loader", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="a `vitscale shards write` output folder")
    parser.add_argument("--workers", type=int, default=available_cpus(), metavar="W")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="timed batches per transform (default: as many as fit in --seconds)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per transform without --batches")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.img_size, args.batch_size, args.batches or 1) < 1 or args.workers < 0:
        raise UserError("--workers must be >= 0 and --img-size, --batch-size, --batches >= 1; "
                        f"got {args.workers}, {args.img_size}, {args.batch_size}, {args.batches}.")
    result = run_benchmark(args.shards, args.workers, args.img_size, args.batch_size, args.batches,
                           args.seconds)
    print(json.dumps(result) if args.json else format_result(result))
    return 0
