"""``vitscale bench loader``: images/s of the training input pipeline on real shards, against the alternatives.

What is timed is the training loader itself: for each of our paths the benchmark builds a
:class:`pretrain.data.loader.ShardTrain` from a :class:`~pretrain.data.config.LoaderSpec` (the
``data`` section's defaults, the shard set of ``--shards``, ``--workers``, ``--img-size``,
``--batch-size`` as the micro batch, seed 0, one rank) and draws batches through ``next_batch()``
as the training loop does: DataLoader workers each owning a slot of the stream, the shuffle
buffer, ``train_transform`` into the shared batch buffers, the hand-over, the rank's copy.
Paths (the JSON's ``runs``):

* ``ours``: that loader with ``data.decode=cpu`` and no RandAugment;
* ``randaug``: the same with ``augment.randaug_layers/magnitude`` = ``--randaug L,M`` (default
  2,15; ``0`` leaves it out);
* ``gpu``: the same with ``data.decode=gpu`` decoding on ``--gpu-device`` (default ``cuda`` when
  present, else left out; ``cpu`` runs the path's code on the CPU);
* ``pil``, ``webdataset``: the baselines of :mod:`pretrain.bench.loader_baselines` in plain
  DataLoaders with as many workers (the rank copies each batch, as ours does);
* ``transform``: ``train_transform`` alone on the same images and crops
  (:class:`~pretrain.bench.loader_baselines.TransformOnly`), the subtrahend of ``overhead``.

Alternating rounds: all paths run in one process, each with its own workers; a round gives each
path ``2 x W`` batches in turn (in reverse order every other round) while the other paths' worker
processes are suspended (SIGSTOP), so paths never compete for the cores, a change in machine load
(these machines are shared) hits all of them alike, and each path's worker CPU is read while only
its workers run. The first ``2 x W`` batches of every path are warm-up (worker start, first reads).
Figures per path:

* ``images_per_s_per_core``: images per CPU-second of the path's worker processes (user + system
  time of every thread, from ``/proc`` through psutil): what one dedicated core sustains, the
  figure to plan cores with;
* ``images_per_s``: images per second of wall time while the path's W workers ran alone
  (``images_per_s_per_worker`` = that / W);
* ``rank_cpu_us_per_image``: CPU of the rank process inside ``next_batch()`` (or the baseline's
  ``next()`` + copy) per image: receiving and copying the batch (for ``gpu``: the decode too);
* ``rank_wait_ms_per_batch``: the rank's wall time per batch in ``next_batch()``; the rank does
  nothing else here, so it is the interval at which W workers deliver;
* ``keys_sha256`` / ``batches_drawn`` (our paths): the digest of every key the loader delivered,
  in order, warm-up included: a ``ShardTrain`` built the same way delivers the same keys.

``overhead`` is everything but decode and augmentation (stream, shuffle buffer, tar parsing,
labels, seeding, hand-over, the rank's copy): ``ours``' worker + rank CPU per image minus the
thread CPU of ``train_transform`` per image on the ``transform`` path, with its spread over five
windows of rounds. ``window_speedups_per_core_vs_baseline`` is the ratio ours / plain PIL in the
same five windows. ``fidelity`` compares the decoded crops with Pillow's full decode
(:mod:`pretrain.bench.fidelity`). ``machine`` has the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import PIL
import psutil
import torch
from PIL import features
from torch.utils.data import DataLoader, IterableDataset

from pretrain.bench import fidelity
from pretrain.bench.loader_baselines import RANDAUG, PilBatches, TransformOnly, webdataset_batches
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.core.system import available_cpus
from pretrain.data import jpeg
from pretrain.data.config import AugmentConfig, DataConfig, LoaderSpec
from pretrain.data.loader import ShardTrain
from pretrain.data.shard_sets import ShardSet, resolve_shards
from pretrain.data.shards import iter_tar_samples
from pretrain.data.transforms import prepare_rand_augment
from pretrain.data.workers import die_with_parent

SEED = 0
_WINDOWS = 5
_PER_WORKER = 2  # batches per worker in the warm-up and in each round of a path
_PREFETCH = 2  # the baselines' DataLoaders: torch's default
_FIDELITY_IMAGES = 250
_ANY_LABEL = 1 << 20  # num_classes when the shard set does not say (no index): every label is in range
# Images/s one H100 consumes at ~50% MFU of 989 TFLOP/s: ~1.0 TFLOP per ViT-H/14 image, ~0.1 for ViT-B/16.
TARGETS = {"ViT-H/14 on one H100": 500, "ViT-B/16 on one H100": 5000}


def loader_spec(source: str, shards: ShardSet, workers: int, img_size: int, batch_size: int,
                randaug: tuple[int, int] = (0, 0), decode: str = "cpu", device: str = "cuda") -> LoaderSpec:
    """The spec a one-rank training run with these settings gives its train loader (the ``data``
    section's defaults otherwise, seed :data:`SEED`)."""
    data = DataConfig(train=source, val=None, workers=workers, multi_label=bool(shards.multi_label), decode=decode)
    return LoaderSpec(data, micro_batch=batch_size, img_size=img_size, num_classes=shards.num_classes or _ANY_LABEL,
                      seed=SEED, augment=AugmentConfig(randaug_layers=randaug[0], randaug_magnitude=randaug[1]),
                      decode_device=device)


def thread_cpu(proc: psutil.Process) -> dict[tuple[int, int], float]:
    """CPU seconds (user + system) of each thread of ``proc``, by (pid, thread id): from each
    thread's ``/proc/PID/task/TID/schedstat`` (the scheduler's runtime in ns; ``/proc/PID/stat``
    counts in 10 ms ticks), else psutil's process total."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                out[(proc.pid, int(tid))] = int(f.read().split()[0]) / 1e9
    except OSError:
        pass
    if not out:
        times = proc.cpu_times()
        out[(proc.pid, 0)] = times.user + times.system
    return out


class TimedPath:
    """One path of the run: ``draw()`` takes a batch and returns ``(rows, extra CPU seconds)``;
    ``close()`` ends its source. :meth:`start` finds the worker processes behind it (the rank's
    new children while it warms up) and suspends them; :meth:`round` resumes them for a number of
    batches and records rows, worker CPU, wall time and the rank's CPU."""

    def __init__(self, name: str, draw: Callable[[], tuple[int, float]], close: Callable[[], None],
                 loader: str | None = None) -> None:
        self.name, self._draw, self._close, self.loader = name, draw, close, loader
        self.procs: list[psutil.Process] = []
        self.rounds: list[dict] = []

    def start(self, workers: int, batches: int) -> None:
        me = psutil.Process()
        before = {p.pid for p in me.children()}
        for _ in range(batches):
            self._draw()
        self.procs = [p for p in me.children() if p.pid not in before]
        if len(self.procs) != workers:
            raise RuntimeError(f"bench loader: path {self.name} started {len(self.procs)} processes, expected "
                               f"{workers} DataLoader workers: {[p.cmdline() for p in self.procs]}")
        self.pause()

    def worker_cpu(self) -> dict[tuple[int, int], float]:
        """CPU seconds so far of every thread of the workers, by (pid, thread id)."""
        return {key: value for p in self.procs for key, value in thread_cpu(p).items()}

    def pause(self) -> None:
        """SIGSTOP the workers and wait until they are stopped (their CPU counters then hold still)."""
        for p in self.procs:
            p.suspend()
        deadline = time.monotonic() + 10.0
        while any(p.status() != psutil.STATUS_STOPPED for p in self.procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench loader: the workers of {self.name} did not stop within 10 s")
            time.sleep(0.0005)

    def round(self, batches: int) -> None:
        cpu = self.worker_cpu()
        for p in self.procs:
            p.resume()
        rows, extra, rank, wall = 0, 0.0, 0.0, time.perf_counter()
        for _ in range(batches):
            start = time.process_time()
            n, e = self._draw()
            rank += time.process_time() - start
            rows, extra = rows + n, extra + e
        wall = time.perf_counter() - wall
        self.pause()
        end = self.worker_cpu()
        self.rounds.append({"rows": rows, "batches": batches, "cpu": sum(v - cpu.get(k, 0.0) for k, v in end.items()),
                            "wall": wall, "rank": rank, "extra": extra})

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
        self._close()


def shard_train_path(name: str, spec: LoaderSpec, record: dict) -> TimedPath:
    """A path that draws from a real :class:`ShardTrain` built from ``spec`` (rank 0 of 1);
    ``record`` receives the digest of the delivered keys and the batch count."""
    source = ShardTrain(spec, rank=0, world=1)
    digest = hashlib.sha256()
    record.update(loader=f"{type(source).__module__}.{type(source).__qualname__}", batches_drawn=0)

    def draw() -> tuple[int, float]:
        batch = source.next_batch()
        if batch.images.is_cuda:
            torch.cuda.synchronize(batch.images.device)
        digest.update("".join(f"{key}\n" for key in batch.keys).encode())
        record.update(batches_drawn=record["batches_drawn"] + 1, keys_sha256=digest.hexdigest())
        return len(batch.keys), 0.0

    return TimedPath(name, draw, source.close, record["loader"])


def dataloader_path(name: str, dataset: IterableDataset, workers: int) -> TimedPath:
    """A path over a plain DataLoader of ``dataset``: image batches are copied by the rank (as
    ``ShardTrain.next_batch`` copies its batches); ``TransformOnly`` batches report their CPU."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=_PREFETCH,
                        worker_init_fn=die_with_parent)
    stream = None  # its workers start on the first draw, as ShardTrain's do

    def draw() -> tuple[int, float]:
        nonlocal stream
        if stream is None:
            stream = iter(loader)
        b = next(stream)
        if isinstance(b, dict):
            return b["rows"], b["transform_cpu"]
        images = b[0].clone()
        return images.shape[0], 0.0

    def close() -> None:
        nonlocal stream
        stream = None  # its workers are joined here

    return TimedPath(name, draw, close)


def timed_run(paths: list[TimedPath], workers: int, batches: int | None, seconds: float) -> int:
    """Start every path (warm-up), then rounds until each path has ``batches`` timed batches, or
    ``seconds`` per path have passed and there are at least five rounds. Returns the rounds."""
    per_round = _PER_WORKER * workers
    for path in paths:
        path.start(workers, per_round)
    rounds, start = 0, time.perf_counter()
    while True:
        for path in (paths if rounds % 2 == 0 else paths[::-1]):
            path.round(per_round)
        rounds += 1
        if batches is not None and rounds * per_round >= batches:
            return rounds
        if batches is None and rounds >= _WINDOWS and time.perf_counter() - start >= seconds * len(paths):
            return rounds


def _windows(rounds: list[dict]) -> list[list[dict]]:
    n = len(rounds)
    return [w for w in (rounds[i * n // _WINDOWS:(i + 1) * n // _WINDOWS] for i in range(_WINDOWS)) if w]


def _total(rounds: list[dict], key: str) -> float:
    return sum(r[key] for r in rounds)


def _per_core(rounds: list[dict]) -> float:
    return _total(rounds, "rows") / max(_total(rounds, "cpu"), 1e-6)  # tiny runs may find no CPU in a window


def summarise(path: TimedPath, workers: int, record: dict | None = None) -> dict:
    """The figures of one path (see the module docstring)."""
    rs = path.rounds
    images, wall = _total(rs, "rows"), _total(rs, "wall")
    out = {"images": images, "batches": _total(rs, "batches"), "rounds": len(rs),
           "worker_processes": len(path.procs), "worker_cpu_seconds": round(_total(rs, "cpu"), 6),
           "images_per_s": round(images / wall, 1), "images_per_s_per_core": round(_per_core(rs), 1),
           "images_per_s_per_worker": round(images / wall / workers, 1),
           "rank_cpu_us_per_image": round(1e6 * _total(rs, "rank") / images, 1),
           "rank_wait_ms_per_batch": round(1e3 * wall / _total(rs, "batches"), 2),
           "window_images_per_s_per_core": [round(_per_core(w), 1) for w in _windows(rs)]}
    if path.name == "transform":
        out["transform_cpu_us_per_image"] = round(1e6 * _total(rs, "extra") / images, 1)
    return {**out, **(record or {})}


def overhead_figures(ours: list[dict], alone: list[dict]) -> dict:
    """Per-image CPU of everything ``ours`` does but decode + augmentation: its worker + rank CPU
    per image minus ``train_transform``'s thread CPU per image on the ``transform`` path (rounds
    of the same run), overall and per window."""
    def split(o: list[dict], a: list[dict]) -> tuple[float, float, float]:
        images = _total(o, "rows")
        return (1e6 * _total(o, "cpu") / images, 1e6 * _total(o, "rank") / images,
                1e6 * _total(a, "extra") / _total(a, "rows"))

    worker, rank, transform = split(ours, alone)
    total = worker + rank - transform
    windows = [sum(split(o, a)[:2]) - split(o, a)[2] for o, a in zip(_windows(ours), _windows(alone), strict=True)]
    return {"method": "ours' worker + rank CPU per image minus train_transform's CPU per image (transform path)",
            "ours_cpu_us_per_image": round(worker + rank, 1), "ours_worker_us_per_image": round(worker, 1),
            "transform_us_per_image": round(transform, 1), "worker_us_per_image": round(worker - transform, 1),
            "rank_us_per_image": round(rank, 1), "us_per_image": round(total, 1),
            "share": round(total / (worker + rank), 3), "window_us_per_image": [round(w, 1) for w in windows]}


def machine_info() -> dict:
    """CPU model, core counts, library versions and the load average, for reading the figures later."""
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
            "simplejpeg": jpeg.simplejpeg.__version__ if jpeg.AVAILABLE else None,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def cores_needed(per_core: float) -> dict[str, int | None]:
    return {name: (math.ceil(rate / per_core) if per_core > 0 else None) for name, rate in TARGETS.items()}


def _fidelity(files: list[str], img_size: int, device: str) -> dict:
    def images():
        n = 0
        for path in files:
            for sample in iter_tar_samples(path):
                image = sample.image()
                if image is not None and n < _FIDELITY_IMAGES:
                    n += 1
                    yield image[1]

    return fidelity.measure(images(), img_size, device=device)


def run_benchmark(source: str | Path, workers: int, img_size: int, batch_size: int, batches: int | None,
                  seconds: float, gpu_device: str | None = None, randaug: tuple[int, int] = RANDAUG) -> dict:
    """Benchmark every path on the train shards ``source`` names (a `shards write` folder, a
    pattern, URLs); the JSON document of ``--json``. ``gpu_device``: where the ``gpu`` path
    decodes (default: ``cuda`` when present, else the path is left out); ``randaug``: (layers,
    magnitude) of the ``randaug`` path, left out when layers is 0."""
    machine = machine_info()
    source = str(source)
    shards = resolve_shards(source, "train", key="--shards")
    files = [url for url, n in zip(shards.urls, shards.counts or [1] * len(shards.urls), strict=True) if n > 0]
    if not files:
        raise UserError(f"--shards {source}: no non-empty train shards; write some with "
                        "`vitscale shards write SRC OUT`.")
    if len(shards.urls) < workers:  # ShardTrain would say so in terms of data.workers
        raise UserError(f"--shards {source} has {len(shards.urls)} shards but --workers {workers} need at least "
                        f"{workers} (each worker of the training loader reads shards of its own): use --workers "
                        f"{len(shards.urls)}, or rewrite them with more shards (a smaller --samples-per-shard)")
    device = gpu_device or ("cuda" if torch.cuda.is_available() else None)
    spec = loader_spec(source, shards, workers, img_size, batch_size)
    records: dict[str, dict] = {"ours": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle intra-op threads spin and would be counted as the rank's CPU
    paths: list[TimedPath] = []
    try:
        paths.append(shard_train_path("ours", spec, records["ours"]))
        if randaug[0] > 0:
            prepare_rand_augment(*randaug)  # torchvision imported before any worker forks
            records["randaug"] = {}
            paths.append(shard_train_path("randaug", loader_spec(source, shards, workers, img_size, batch_size,
                                                                 randaug), records["randaug"]))
        d = spec.data
        paths.append(dataloader_path("transform", TransformOnly(files, img_size, batch_size, SEED, d.crop_scale_min,
                                                                d.hflip), workers))
        paths.append(dataloader_path("pil", PilBatches(files, img_size, batch_size, SEED), workers))
        paths.append(dataloader_path("webdataset", webdataset_batches(files, img_size, batch_size, workers, SEED),
                                     workers))
        if device:
            records["gpu"] = {}
            paths.append(shard_train_path("gpu", loader_spec(source, shards, workers, img_size, batch_size,
                                                             decode="gpu", device=device), records["gpu"]))
        rounds = timed_run(paths, workers, batches, seconds)
    finally:
        for path in paths:
            path.close()
        torch.set_num_threads(threads)
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    by_name = {p.name: p for p in paths}
    runs = {p.name: summarise(p, workers, records.get(p.name)) for p in paths}
    ours, base, wds = runs["ours"], runs["pil"], runs["webdataset"]
    return {
        "loader": ours["loader"],
        "images_per_s": ours["images_per_s"],
        "images_per_s_per_core": ours["images_per_s_per_core"],
        "baseline_images_per_s": base["images_per_s"],
        "baseline_images_per_s_per_core": base["images_per_s_per_core"],
        "webdataset_images_per_s": wds["images_per_s"],
        "webdataset_images_per_s_per_core": wds["images_per_s_per_core"],
        "speedup_vs_baseline": round(ours["images_per_s"] / base["images_per_s"], 3),
        "speedup_per_core_vs_baseline": round(ours["images_per_s_per_core"] / base["images_per_s_per_core"], 3),
        "speedup_per_core_vs_webdataset": round(ours["images_per_s_per_core"] / wds["images_per_s_per_core"], 3),
        "window_speedups_per_core_vs_baseline": [round(_per_core(a) / _per_core(b), 3) for a, b in zip(
            _windows(by_name["ours"].rounds), _windows(by_name["pil"].rounds), strict=True)],
        "randaug": ({"layers": randaug[0], "magnitude": randaug[1],
                     "images_per_s_per_core": runs["randaug"]["images_per_s_per_core"],
                     "images_per_s": runs["randaug"]["images_per_s"],
                     "per_core_vs_ours": round(runs["randaug"]["images_per_s_per_core"]
                                               / ours["images_per_s_per_core"], 3)}
                    if "randaug" in runs else None),
        "decoder": "simplejpeg (libjpeg-turbo)" if jpeg.AVAILABLE else "Pillow (simplejpeg not installed)",
        "overhead": overhead_figures(by_name["ours"].rounds, by_name["transform"].rounds),
        "fidelity": _fidelity(files, img_size, device or "cpu"),
        "workers": workers,
        "img_size": img_size,
        "batch_size": batch_size,
        "shards": len(files),
        "samples": shards.samples,
        "rounds": rounds,
        "batches_per_round": _PER_WORKER * workers,
        "runs": runs,
        "cores_needed": cores_needed(ours["images_per_s_per_core"]),
        "machine": machine,
    }


_TITLES = {"ours": "ours (ShardTrain)", "randaug": "ours + RandAugment", "transform": "train_transform alone",
           "pil": "plain PIL path", "webdataset": "webdataset .decode('pil')", "gpu": "ours, data.decode=gpu"}


def format_result(r: dict) -> str:
    """The human summary of :func:`run_benchmark`."""
    m, runs, o, f = r["machine"], r["runs"], r["overhead"], r["fidelity"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable of {m['cpu_count']} cores, GPU {m['gpu']}, "
        f"torch {m['torch']}, Pillow {m['pillow']} (libjpeg-turbo: {m['libjpeg_turbo']}), "
        f"simplejpeg {m['simplejpeg']}; load average {m['load_avg_start']} at the start, "
        f"{m['load_avg_end']} at the end",
        f"data: {r['samples']} samples in {r['shards']} train shards, img_size {r['img_size']}, "
        f"batch {r['batch_size']}, {r['workers']} workers; decoder: {r['decoder']}; timed: {r['loader']}, "
        f"{r['rounds']} alternating rounds of {r['batches_per_round']} batches per path",
        f"{'':28}{'img/s (wall)':>14}{'img/s/worker':>14}{'img/s per core':>16}{'rank us/img':>13}"
        f"{'rank ms/batch':>15}",
    ]
    for name, run in runs.items():
        lines.append(f"{_TITLES[name]:28}{run['images_per_s']:>14.1f}{run['images_per_s_per_worker']:>14.1f}"
                     f"{run['images_per_s_per_core']:>16.1f}{run['rank_cpu_us_per_image']:>13.1f}"
                     f"{run['rank_wait_ms_per_batch']:>15.2f}")
    windows = ", ".join(f"{x:.2f}" for x in r["window_speedups_per_core_vs_baseline"])
    lines.append(f"ours per core: {r['speedup_per_core_vs_baseline']:.2f}x the plain PIL path (by window: {windows}), "
                 f"{r['speedup_per_core_vs_webdataset']:.2f}x webdataset (wall: {r['speedup_vs_baseline']:.2f}x PIL)")
    if r["randaug"]:
        ra = r["randaug"]
        lines.append(f"RandAugment({ra['layers']}, {ra['magnitude']}) on: {ra['images_per_s_per_core']:.1f} img/s per "
                     f"core = {ra['per_core_vs_ours']:.2f}x ours without it")
    spread = ", ".join(f"{x:.0f}" for x in o["window_us_per_image"])
    lines.append(f"everything but decode + augmentation: {o['us_per_image']:.0f} us/image (by window: {spread}; "
                 f"{o['worker_us_per_image']:.0f} in the workers, {o['rank_us_per_image']:.0f} in the rank) = "
                 f"{100 * o['share']:.1f}% of ours' {o['ours_cpu_us_per_image']:.0f} us/image "
                 f"(train_transform alone: {o['transform_us_per_image']:.0f})")
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
    """``vitscale bench loader --shards SHARDS [--workers W] [--img-size S] [--batches N] [--json]``."""
    parser = argparse.ArgumentParser(prog="vitscale bench loader", description=doc_help(__doc__.split("\n")[0]))
    parser.add_argument("--shards", required=True,
                        help="the train shards, as data.train takes them: a `vitscale shards write` folder, a pattern")
    parser.add_argument("--workers", type=int, default=available_cpus(), metavar="W",
                        help="DataLoader workers of every path (data.workers; default: the usable cores)")
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
    if len(randaug) != 2 or min(randaug) < 0 or randaug[1] > 30:
        raise UserError(f"--randaug takes LAYERS,MAGNITUDE (e.g. 2,15; magnitude at most 30) or 0; "
                        f"got {args.randaug!r}.")
    if min(args.workers, args.img_size, args.batch_size, args.batches or 1) < 1:
        raise UserError("--workers, --img-size, --batch-size and --batches must be >= 1 (the benchmark times "
                        f"worker processes); got {args.workers}, {args.img_size}, {args.batch_size}, {args.batches}.")
    result = run_benchmark(args.shards, args.workers, args.img_size, args.batch_size, args.batches,
                           args.seconds, args.gpu_device, randaug)
    result["command"] = " ".join(["vitscale bench loader", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(result) if args.json else format_result(result))
    return 0
