"""``vitscale bench loader``: images/s of the input pipeline on real shards, ours vs the alternatives.

Reads the train shards listed in ``OUT/index.json`` in a torch DataLoader with W worker
processes (each worker takes every W-th shard, or every W-th sample when there are fewer shards
than workers), loops over them as many times as needed, and times, in the same run, the paths of
:mod:`pretrain.bench.loader_paths`: ``ours`` (the training loader's CPU path), ``pil`` (the plain
Pillow full-decode path), ``webdataset`` (WebDataset's ``.decode("pil")`` + the same crop), and
``randaug`` (ours + RandAugment, ``--randaug L,M``, default 2,15; ``0`` leaves it out),
``overhead`` (ours without decoding: tar parsing, labels, seeding, collation, hand-over), plus
``gpu`` (``data.decode=gpu``) when a CUDA device is present or ``--gpu-device`` names one.

The paths run side by side (:class:`~pretrain.bench.loader_paths.MixedBatches`): every worker
makes one batch of each path in turn, so a change in machine load (this project's machines are
shared) hits all paths alike, instead of whichever path ran at that moment. The first two
batches of every path and worker are warm-up. Rates per path:

* ``images_per_s_per_core``: images per CPU-second of the worker thread that reads, decodes and
  collates (``time.thread_time`` around each batch), i.e. what one dedicated core sustains, the
  figure to plan core counts with. The threads that pickle batches and pass shared-memory handles
  are not counted (they cost the plain paths more than ours, which hands over four numbers);
* ``images_per_s``: images per second of worker wall time, times W: what W workers running that
  path alone would deliver (``images_per_s_per_worker`` = that / W);
* ``main_cpu_us_per_image``: CPU of the receiving (main) thread per image: the hand-over and the
  copy into reused memory that DataLoader's pin-memory thread makes of every batch (for ``gpu``:
  the host side of the device decode).

``window_speedups_per_core_vs_baseline`` splits the timed batches into five consecutive windows:
the spread of the ratio over the run. ``overhead`` is what everything but decode and
augmentation costs per image (the ``overhead`` path's worker CPU plus ours' hand-over) and its
share of ours' total. ``fidelity`` compares the decoded crops with Pillow's full decode
(:mod:`pretrain.bench.fidelity`).
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
from pretrain.bench.loader_paths import CPU_PATHS, HANDOVER_SLOTS, PREFETCH, RANDAUG, MixedBatches
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.core.system import available_cpus
from pretrain.data import jpeg
from pretrain.data.device_decode import decode_packed
from pretrain.data.handover import SharedBatches, SlotRef
from pretrain.data.shards import iter_tar_samples, load_index
from pretrain.data.transforms import prepare_rand_augment

_WINDOWS = 5
_WARMUP_BATCHES = 2
_FIDELITY_IMAGES = 250
# Images/s one H100 consumes at ~50% MFU of 989 TFLOP/s: ~1.0 TFLOP per ViT-H/14 image, ~0.1 for ViT-B/16.
TARGETS = {"ViT-H/14 on one H100": 500, "ViT-B/16 on one H100": 5000}


def timed_run(files: list[str], paths: list[str], workers: int, img_size: int, batch_size: int,
              batches: int | None, seconds: float, device: str | None = None,
              randaug: tuple[int, int] = RANDAUG) -> dict[str, list[dict]]:
    """All ``paths`` side by side in one DataLoader: ``batches`` timed batches per path, or as many
    as fit in ``seconds`` per path. Returns, per path, one record per timed batch (arrival order):
    rows, worker CPU and wall seconds, main-thread CPU seconds."""
    buffers = SharedBatches(workers, HANDOVER_SLOTS, batch_size, img_size)
    if "randaug" in paths:
        prepare_rand_augment(*randaug)  # torchvision imported before the workers fork
    loader = DataLoader(MixedBatches(files, paths, img_size, batch_size, workers, buffers=buffers, randaug=randaug),
                        batch_size=None,
                        num_workers=workers, prefetch_factor=PREFETCH if workers > 0 else None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle intra-op threads spin and would be counted as hand-over CPU
    records: dict[str, list[dict]] = {path: [] for path in paths}
    seen: dict[tuple[str, int], int] = {}
    target: dict[str, torch.Tensor] = {}  # stands for the pinned memory a batch is copied into
    stream, start = iter(loader), time.perf_counter()
    while True:
        main = time.thread_time()
        b = next(stream)
        path, images = b["path"], b["images"]
        if path == "gpu":
            images, _ = decode_packed(images, img_size, device)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
        else:  # what the pin-memory thread does with every batch: copy it into reused memory
            images = images.view() if isinstance(images, SlotRef) else images
            if path not in target or target[path].shape != images.shape:
                target[path] = torch.empty_like(images)
            target[path].copy_(images)
        main = time.thread_time() - main
        key = (path, b["worker"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > _WARMUP_BATCHES:
            records[path].append({"rows": b["rows"], "cpu": b["cpu"], "wall": b["wall"], "main": main})
        done = min(len(r) for r in records.values())
        if (batches is not None and done >= batches) or \
                (batches is None and time.perf_counter() - start >= seconds * len(paths) and done >= _WINDOWS):
            break
    del stream
    buffers.close()
    torch.set_num_threads(threads)
    return records


def _rates(records: list[dict], workers: int) -> tuple[float, float]:
    """(images per worker CPU-second, images per second of wall time for W workers)."""
    images = sum(r["rows"] for r in records)
    return images / sum(r["cpu"] for r in records), images / sum(r["wall"] for r in records) * max(1, workers)


def _summarise(records: list[dict], workers: int) -> dict:
    images = sum(r["rows"] for r in records)
    per_core, rate = _rates(records, workers)
    windows = [records[i * len(records) // _WINDOWS:(i + 1) * len(records) // _WINDOWS] for i in range(_WINDOWS)]
    return {"images": images, "batches": len(records), "worker_cpu_seconds": round(sum(r["cpu"] for r in records), 3),
            "images_per_s": round(rate, 1), "images_per_s_per_core": round(per_core, 1),
            "images_per_s_per_worker": round(rate / max(1, workers), 1),
            "main_cpu_us_per_image": round(1e6 * sum(r["main"] for r in records) / images, 1),
            "window_images_per_s_per_core": [round(_rates(w, workers)[0], 1) for w in windows if w]}


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
                  seconds: float, gpu_device: str | None = None, randaug: tuple[int, int] = RANDAUG) -> dict:
    """Benchmark every path on the train shards of ``out``; the JSON document of ``--json``.
    ``gpu_device``: where the ``gpu`` path decodes (default: ``cuda`` when present, else skipped);
    ``randaug``: (layers, magnitude) of the ``randaug`` path, left out when layers is 0."""
    index = load_index(out)
    shards = index["splits"].get("train", {}).get("shards", [])
    files = [str(out / s["file"]) for s in shards if s.get("samples", 0) > 0]
    if not files:
        raise UserError(f"{out / 'index.json'} lists no non-empty train shards; write some with "
                        "`vitscale shards write SRC OUT`.")
    device = gpu_device or ("cuda" if torch.cuda.is_available() else None)
    paths = [*CPU_PATHS, *(["randaug"] if randaug[0] > 0 else []), "overhead"] + (["gpu"] if device else [])
    records = timed_run(files, paths, workers, img_size, batch_size, batches, seconds, device, randaug)
    runs = {name: _summarise(r, workers) for name, r in records.items()}
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
        "window_speedups_per_core_vs_baseline": [round(a / b, 3) for a, b in zip(
            ours["window_images_per_s_per_core"], base["window_images_per_s_per_core"], strict=False)],
        "randaug": ({"layers": randaug[0], "magnitude": randaug[1],
                     "images_per_s_per_core": runs["randaug"]["images_per_s_per_core"],
                     "per_core_vs_ours": round(runs["randaug"]["images_per_s_per_core"]
                                               / ours["images_per_s_per_core"], 3)}
                    if "randaug" in runs else None),
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


_TITLES = {"ours": "ours (train_transform)", "randaug": "ours + RandAugment",
           "pil": "plain PIL path", "webdataset": "webdataset .decode('pil')",
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
    windows = ", ".join(f"{x:.2f}" for x in r["window_speedups_per_core_vs_baseline"])
    lines.append(f"ours per core: {r['speedup_per_core_vs_baseline']:.2f}x the plain PIL path (by window: {windows}), "
                 f"{r['speedup_per_core_vs_webdataset']:.2f}x webdataset (wall: {r['speedup_vs_baseline']:.2f}x PIL)")
    if r["randaug"]:
        ra = r["randaug"]
        lines.append(f"RandAugment({ra['layers']}, {ra['magnitude']}) on: {ra['images_per_s_per_core']:.1f} img/s per "
                     f"core = {ra['per_core_vs_ours']:.2f}x ours without it")
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
    parser = argparse.ArgumentParser(prog="vitscale bench loader", description=doc_help(__doc__.split("\n")[0]))
    parser.add_argument("--shards", type=Path, required=True, help="a `vitscale shards write` output folder")
    parser.add_argument("--workers", type=int, default=available_cpus(), metavar="W")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="timed batches per path (default: as many as fit in --seconds)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per path without --batches")
    parser.add_argument("--gpu-device", default=None, metavar="DEV",
                        help="also time data.decode=gpu decoding there (default: cuda when present)")
    parser.add_argument("--randaug", default=",".join(map(str, RANDAUG)), metavar="L,M",
                        help="layers,magnitude of the RandAugment path (default %(default)s; 0 leaves it out)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        randaug = tuple(int(x) for x in args.randaug.split(",")) if args.randaug.strip() != "0" else (0, 0)
    except ValueError:
        randaug = ()
    if len(randaug) != 2 or min(randaug) < 0:
        raise UserError(f"--randaug takes LAYERS,MAGNITUDE (e.g. 2,15) or 0; got {args.randaug!r}.")
    if min(args.img_size, args.batch_size, args.batches or 1) < 1 or args.workers < 0:
        raise UserError("--workers must be >= 0 and --img-size, --batch-size, --batches >= 1; "
                        f"got {args.workers}, {args.img_size}, {args.batch_size}, {args.batches}.")
    result = run_benchmark(args.shards, args.workers, args.img_size, args.batch_size, args.batches,
                           args.seconds, args.gpu_device, randaug)
    print(json.dumps(result) if args.json else format_result(result))
    return 0
