"""``vitscale bench loader``: images/s of the input pipeline on real shards, ours vs the alternatives.

Reads the train shards listed in ``OUT/index.json`` in a torch DataLoader with W worker
processes (each worker takes every W-th shard, or every W-th sample when there are fewer shards
than workers), loops over them as many times as needed, and times, in the same run, the paths of
:mod:`pretrain.bench.loader_paths`: ``ours`` (the training loader's CPU path), ``pil`` (the plain
Pillow full-decode path), ``webdataset`` (WebDataset's ``.decode("pil")`` + the same crop), and
``overhead`` (ours without decoding: tar parsing, labels, seeding, collation, hand-over), plus
``gpu`` (``data.decode=gpu``) when a CUDA device is present or ``--gpu-device`` names one. The paths
alternate in rounds (ours, pil, webdataset, ..., ours, ...) with a fresh DataLoader each, so a change
in machine load hits all alike. Per round the first ``(prefetch + 1) x W`` batches are warm-up
(worker start, initial prefetch burst).

Rates reported per path:

* ``images_per_s``: wall clock, all workers together, what the training loop would see;
* ``images_per_s_per_core``: images per CPU-second spent in the workers (each worker reports
  its own ``time.process_time``), i.e. what one dedicated core sustains. It does not move when
  other processes share the machine, so it is the figure to plan core counts with;
  ``images_per_s_per_worker`` (wall / W) is given too;
* ``main_cpu_us_per_image``: CPU time of the receiving (main) process per image: the hand-over
  (and for ``gpu`` the device decode's host side).

``overhead_share`` is what everything but the decode and augmentation costs per image (the
``overhead`` path's worker CPU plus ours' hand-over) as a share of ours' total CPU per image.
``fidelity`` compares the decoded crops with Pillow's full decode (:mod:`pretrain.bench.fidelity`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import PIL
import torch
from PIL import features
from torch.utils.data import DataLoader

from pretrain.bench import fidelity
from pretrain.bench.loader_paths import CPU_PATHS, HANDOVER_SLOTS, PREFETCH, dataset
from pretrain.core.errors import UserError
from pretrain.core.system import available_cpus
from pretrain.data import jpeg
from pretrain.data.device_decode import decode_packed
from pretrain.data.handover import SharedBatches, SlotRef
from pretrain.data.shards import iter_tar_samples, load_index

_ROUNDS = 5
_FIDELITY_IMAGES = 250
# Images/s one H100 consumes at ~50% MFU of 989 TFLOP/s: ~1.0 TFLOP per ViT-H/14 image, ~0.1 for ViT-B/16.
TARGETS = {"ViT-H/14 on one H100": 500, "ViT-B/16 on one H100": 5000}


def timed_round(files: list[str], path: str, workers: int, img_size: int, batch_size: int,
                batches: int | None, seconds: float, seed: int = 0, device: str | None = None) -> dict:
    """One round of ``path`` with a fresh DataLoader: ``batches`` timed batches, or as many as fit
    in ``seconds``.

    Returns images, wall seconds, the images/CPU-seconds measured between each worker's first
    and last timed batch (a worker's first timed batch only marks its starting CPU time), and the
    main process's CPU seconds over the timed batches.
    """
    buffers = SharedBatches(workers, HANDOVER_SLOTS, batch_size, img_size) if path in ("ours", "overhead") else None
    loader = DataLoader(dataset(files, path, img_size, batch_size, workers, seed, buffers), batch_size=None,
                        num_workers=workers, prefetch_factor=PREFETCH if workers > 0 else None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle intra-op threads spin and would be counted as hand-over CPU
    stream = iter(loader)
    for _ in range((PREFETCH + 1) * max(1, workers)):
        next(stream)
    target = None  # stands for the pinned memory a batch is copied into (same layout)
    images = timed = 0
    cpu_first: dict[int, float] = {}
    cpu_last: dict[int, float] = {}
    cpu_images: dict[int, int] = {}
    start, main_start = time.perf_counter(), time.process_time()
    while True:
        batch, _, worker_ids, cpu = next(stream)
        if path == "gpu":
            batch, _ = decode_packed(batch, img_size, device)
            if batch.is_cuda:
                torch.cuda.synchronize(batch.device)
        else:  # what the pin-memory thread does with every batch: copy it into reused memory
            batch = batch.view() if isinstance(batch, SlotRef) else batch
            target = torch.empty_like(batch) if target is None or target.shape != batch.shape else target
            target.copy_(batch)
        worker = int(worker_ids if isinstance(worker_ids, int) else worker_ids[0])
        now = float(cpu if isinstance(cpu, float) else max(cpu))
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
    main_cpu = time.process_time() - main_start
    del stream
    if buffers is not None:
        buffers.close()
    torch.set_num_threads(threads)
    cpu_seconds = sum(cpu_last[w] - cpu_first[w] for w in cpu_last)
    return {"images": images, "batches": timed, "seconds": elapsed,
            "cpu_images": sum(cpu_images.values()), "cpu_seconds": cpu_seconds, "main_cpu_seconds": main_cpu}


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
            "main_cpu_us_per_image": round(1e6 * sum(r["main_cpu_seconds"] for r in rounds) / images, 1),
            "round_images_per_s": [round(r["images"] / r["seconds"], 1) for r in rounds],
            "round_images_per_s_per_core": [round(r["cpu_images"] / r["cpu_seconds"], 1)
                                            for r in rounds if r["cpu_seconds"] > 0]}


def machine_info() -> dict:
    """CPU model, core counts and library versions, for reading the figures later."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cores": available_cpus(), "gpu": gpu,
            "torch": torch.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
            "simplejpeg": jpeg.simplejpeg.__version__ if jpeg.AVAILABLE else None}


def cores_needed(per_core: float) -> dict[str, int | None]:
    return {name: (math.ceil(rate / per_core) if per_core > 0 else None) for name, rate in TARGETS.items()}


def overhead_figures(runs: dict) -> dict:
    """Per-image CPU of everything but decode + augmentation, and its share of ours' total."""
    ours, over = runs["ours"], runs["overhead"]
    ours_us = 1e6 / ours["images_per_s_per_core"] + ours["main_cpu_us_per_image"]
    worker_us = 1e6 / over["images_per_s_per_core"]
    total = worker_us + ours["main_cpu_us_per_image"]
    return {"ours_cpu_us_per_image": round(ours_us, 1), "worker_us_per_image": round(worker_us, 1),
            "handover_us_per_image": ours["main_cpu_us_per_image"], "us_per_image": round(total, 1),
            "share": round(total / ours_us, 3)}


def _fidelity(files: list[str], img_size: int, device: str) -> dict:
    def images():
        n = 0
        for path in files:
            for sample in iter_tar_samples(Path(path)):
                image = sample.image()
                if image is not None and n < _FIDELITY_IMAGES:
                    n += 1
                    yield image[1]

    return fidelity.measure(images(), img_size, device=device)


def run_benchmark(out: Path, workers: int, img_size: int, batch_size: int, batches: int | None,
                  seconds: float, gpu_device: str | None = None) -> dict:
    """Benchmark every path on the train shards of ``out``; the JSON document of ``--json``.
    ``gpu_device``: where the ``gpu`` path decodes (default: ``cuda`` when present, else skipped)."""
    index = load_index(out)
    shards = index["splits"].get("train", {}).get("shards", [])
    files = [str(out / s["file"]) for s in shards if s.get("samples", 0) > 0]
    if not files:
        raise UserError(f"{out / 'index.json'} lists no non-empty train shards; write some with "
                        "`vitscale shards write SRC OUT`.")
    device = gpu_device or ("cuda" if torch.cuda.is_available() else None)
    paths = [*CPU_PATHS, "overhead"] + (["gpu"] if device else [])
    rounds: dict[str, list[dict]] = {name: [] for name in paths}
    count = 1 if batches is not None else _ROUNDS
    for i in range(count):
        for name in paths:
            rounds[name].append(timed_round(files, name, workers, img_size, batch_size, batches,
                                            seconds / count, seed=i, device=device))
    runs = {name: _summarise(r, workers) for name, r in rounds.items()}
    ours, base, wds = runs["ours"], runs["pil"], runs["webdataset"]
    return {
        "images_per_s": ours["images_per_s"],
        "images_per_s_per_core": ours["images_per_s_per_core"],
        "baseline_images_per_s": base["images_per_s"],
        "baseline_images_per_s_per_core": base["images_per_s_per_core"],
        "webdataset_images_per_s": wds["images_per_s"],
        "webdataset_images_per_s_per_core": wds["images_per_s_per_core"],
        "speedup_vs_baseline": round(ours["images_per_s"] / base["images_per_s"], 3),
        "speedup_per_core_vs_baseline": round(ours["images_per_s_per_core"] / base["images_per_s_per_core"], 3),
        "speedup_per_core_vs_webdataset": round(ours["images_per_s_per_core"] / wds["images_per_s_per_core"], 3),
        "round_speedups_per_core_vs_baseline": [round(a / b, 3) for a, b in zip(
            ours["round_images_per_s_per_core"], base["round_images_per_s_per_core"], strict=False)],
        "decoder": "simplejpeg (libjpeg-turbo)" if jpeg.AVAILABLE else "Pillow (simplejpeg not installed)",
        "overhead": overhead_figures(runs),
        "fidelity": _fidelity(files, img_size, device or "cpu"),
        "workers": workers,
        "img_size": img_size,
        "batch_size": batch_size,
        "shards": len(files),
        "samples": sum(s["samples"] for s in shards),
        "runs": runs,
        "cores_needed": cores_needed(ours["images_per_s_per_core"]),
        "machine": machine_info(),
    }


_TITLES = {"ours": "ours (train_transform)", "pil": "plain PIL path", "webdataset": "webdataset .decode('pil')",
           "overhead": "overhead (no decode)", "gpu": "gpu (data.decode=gpu)"}


def format_result(r: dict) -> str:
    """The human summary of :func:`run_benchmark`."""
    m, runs, o, f = r["machine"], r["runs"], r["overhead"], r["fidelity"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable of {m['cpu_count']} cores, GPU {m['gpu']}, "
        f"torch {m['torch']}, Pillow {m['pillow']} (libjpeg-turbo: {m['libjpeg_turbo']}), "
        f"simplejpeg {m['simplejpeg']}",
        f"data: {r['samples']} samples in {r['shards']} train shards, img_size {r['img_size']}, "
        f"batch {r['batch_size']}, {r['workers']} workers; decoder: {r['decoder']}",
        f"{'':28}{'img/s (wall)':>14}{'img/s/worker':>14}{'img/s per core':>16}{'main us/img':>13}",
    ]
    for name, run in runs.items():
        lines.append(f"{_TITLES[name]:28}{run['images_per_s']:>14.1f}{run['images_per_s_per_worker']:>14.1f}"
                     f"{run['images_per_s_per_core']:>16.1f}{run['main_cpu_us_per_image']:>13.1f}")
    lines.append(f"ours per core: {r['speedup_per_core_vs_baseline']:.2f}x the plain PIL path, "
                 f"{r['speedup_per_core_vs_webdataset']:.2f}x webdataset (wall: {r['speedup_vs_baseline']:.2f}x PIL)")
    lines.append(f"everything but decode + augmentation: {o['us_per_image']:.0f} us/image "
                 f"({o['worker_us_per_image']:.0f} in the worker, {o['handover_us_per_image']:.0f} hand-over) = "
                 f"{100 * o['share']:.1f}% of ours' "
                 f"{o['ours_cpu_us_per_image']:.0f} us/image")
    for name in ("ours", "gpu_path"):
        q = f[name]
        if q.get("images"):
            lines.append(f"fidelity vs Pillow full decode ({name}{', ' + q['device'] if 'device' in q else ''}, "
                         f"{q['images']} crops): mean abs diff {q['mad']:.2f} grey levels, PSNR {q['psnr_db']:.1f} "
                         f"dB (worst image {q['worst_mad']:.2f}, {q['worst_psnr_db']:.1f} dB)")
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
                        help="timed batches per path (default: as many as fit in --seconds)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per path without --batches")
    parser.add_argument("--gpu-device", default=None, metavar="DEV",
                        help="also time data.decode=gpu decoding there (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.img_size, args.batch_size, args.batches or 1) < 1 or args.workers < 0:
        raise UserError("--workers must be >= 0 and --img-size, --batch-size, --batches >= 1; "
                        f"got {args.workers}, {args.img_size}, {args.batch_size}, {args.batches}.")
    result = run_benchmark(args.shards, args.workers, args.img_size, args.batch_size, args.batches,
                           args.seconds, args.gpu_device)
    print(json.dumps(result) if args.json else format_result(result))
    return 0
