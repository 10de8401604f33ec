"""Benchmark of the data tools at scale: `shards write` in parts, and `shards dedup`.

Run from the repository root (PYTHONPATH=. when vitscale is not installed)::

    python bench/shards_tools.py --images ../shared/data/imagenet-sample [--repeats 3]

It runs the real commands as a user does (``python -m pretrain shards ...`` in child processes)
and writes ``bench/results/<machine>-shards-<date>.json``. Measured:

* **Sharding**: ``shards write IMAGES OUT`` in two modes, copying the JPEGs (the default) and
  re-encoding them (``--resize-max 512 --quality 90``, what the README's ImageNet commands do); as
  one process with 1 and 2 workers, as two parts (``--part 0/2``, ``--part 1/2``, one worker each)
  one after the other and at the same time. Wall time per run includes process start, listing,
  planning and the merge; CPU time is the children's user + system time (the workers included).
  images/s per core = images / CPU seconds; per part = the part's images / its wall time. A run
  of the same command on a one-image folder gives the fixed cost of a process (start, imports,
  listing, merge); "marginal" rates leave it out (what a long run approaches; the estimates for
  ImageNet-21k use them). Every run's shards are compared with the first one's (byte-identical).
* **Listing and planning** per source record, the part of a run every part repeats: the scan of
  the local sample folder, and plan + listing fingerprint of an in-memory listing of 200,000 records.
* **Dedup**: ``shards dedup TRAIN --against VAL --workers W`` on a set built from the ImageNet
  images (VAL: the first 100 as shards; TRAIN: 100 near-copies of them, 25 each resized /
  re-encoded / cropped 2-5% / brightened, plus the other 150 images), with its throughput
  (images hashed per CPU second) and precision/recall at thresholds 4..16 read off the nearest
  distances; the same on the drawn images of tests/test_dedup.py (60 eval, 40 copies + 200
  distinct); the distances between the hashes of the distinct ImageNet images (every pair); and
  the matching cost (Hamming distances per CPU second).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.dedup import HASH_SIZE, nearest, perceptual_hash  # noqa: E402
from data_tools.encode import EncodeOptions  # noqa: E402
from data_tools.parts import listing_fingerprint  # noqa: E402
from data_tools.plan import plan_shards, sanitize_key  # noqa: E402
from data_tools.sources import SourceRecord, SourceScan, scan_source  # noqa: E402
from pretrain.core.system import available_cpus  # noqa: E402
from tests.test_dedup import KINDS, _jpeg, natural_image, near_copy  # noqa: E402

IN21K_IMAGES = 14_197_122
IN1K_VAL = 50_000
THRESHOLDS = (4, 6, 8, 10, 12, 14, 16)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _vitscale(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> list[float]:
    """Wait for every process; return each one's wall seconds from now (they run in parallel)."""
    t0, done = time.perf_counter(), {}
    while len(done) < len(procs):
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                done[i] = time.perf_counter() - t0
                out, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"{p.args} failed:\n{out}\n{err}")
        time.sleep(0.005)
    return [done[i] for i in range(len(procs))]


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("*.tar")) + [out / "index.json", out / "classes.json"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def bench_write(images: Path, work: Path, repeats: int, per_shard: int) -> dict:
    """Every sharding scenario in both modes (see the module docstring)."""
    n = sum(1 for p in images.rglob("*") if p.is_file())
    modes = {"copy": [], "reencode": ["--resize-max", "512", "--quality", "90"]}
    scenarios = {"one process, 1 worker": [["--workers", "1"]],
                 "one process, 2 workers": [["--workers", "2"]],
                 "2 parts one after the other (1 worker each)": "serial",
                 "2 parts at the same time (1 worker each)": [["--part", "0/2", "--workers", "1"],
                                                              ["--part", "1/2", "--workers", "1"]]}
    results: dict = {}
    one = work / "one-image"
    first = next(p for p in sorted(images.rglob("*")) if p.is_file())
    (one / first.parent.name).mkdir(parents=True)
    shutil.copy(first, one / first.parent.name / first.name)
    for mode, extra in modes.items():
        fixed_wall, fixed_cpu = [], []
        for r in range(repeats):  # what a run costs besides its images: start, imports, listing, merge
            out = work / f"{mode}-fixed-{r}"
            cpu0, t0 = _children_cpu(), time.perf_counter()
            _wait([_vitscale("shards", "write", str(one), str(out), "--workers", "1", "--no-progress", *extra)])
            fixed_wall.append(time.perf_counter() - t0)
            fixed_cpu.append(_children_cpu() - cpu0)
            shutil.rmtree(out)
        fixed = {"wall_s": round(statistics.median(fixed_wall), 3), "cpu_s": round(statistics.median(fixed_cpu), 3)}
        results.setdefault(mode, {})["fixed_cost_per_process (a one-image run)"] = fixed
        reference = None
        for name, runs in scenarios.items():
            walls, cpus, part_walls = [], [], []
            for r in range(repeats):
                out = work / f"{mode}-{len(results)}-{r}-{name.split()[0]}"
                shutil.rmtree(out, ignore_errors=True)
                common = ["shards", "write", str(images), str(out), "--samples-per-shard", str(per_shard),
                          "--no-progress", *extra]
                cpu0, t0 = _children_cpu(), time.perf_counter()
                if runs == "serial":
                    part_walls.append([_wait([_vitscale(*common, "--part", f"{i}/2", "--workers", "1")])[0]
                                       for i in range(2)])
                else:
                    w = _wait([_vitscale(*common, *args) for args in runs])
                    if len(runs) > 1:
                        part_walls.append(w)
                walls.append(time.perf_counter() - t0)
                cpus.append(_children_cpu() - cpu0)
                digest = _digest(out)
                reference = reference or digest
                assert digest == reference, f"{mode} {name}: shards differ from the first run's"
                shutil.rmtree(out)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            processes = 1 if runs != "serial" and len(runs) == 1 else 2
            rec = {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                   "images_per_s": round(n / wall, 1), "images_per_s_per_core": round(n / cpu, 1),
                   "marginal_images_per_s_per_core": round(n / max(1e-9, cpu - processes * fixed["cpu_s"]), 1),
                   "walls_s": [round(w, 3) for w in walls]}
            if part_walls:
                per_part = [statistics.median(p[i] for p in part_walls) for i in range(2)]
                rec["part_wall_s"] = [round(w, 3) for w in per_part]
                rec["images_per_s_per_part"] = round((n / 2) / statistics.mean(per_part), 1)
                rec["marginal_images_per_s_per_part"] = round(
                    (n / 2) / max(1e-9, statistics.mean(per_part) - fixed["wall_s"]), 1)
            results.setdefault(mode, {})[name] = rec
            print(f"write {mode:8s} {name:45s} {rec['images_per_s']:7.1f} img/s wall, "
                  f"{rec['images_per_s_per_core']:7.1f} img/s per core "
                  f"({rec['marginal_images_per_s_per_core']:.0f} without the fixed cost)"
                  + (f", {rec['images_per_s_per_part']:.1f} img/s per part" if "images_per_s_per_part" in rec else ""),
                  flush=True)
        results[mode]["byte_identical_across_scenarios"] = True
    return results


def bench_listing(images: Path) -> dict:
    """Seconds per source record of what every part repeats: scan (stat), plan and fingerprint."""
    t0 = time.process_time()
    for _ in range(20):
        scan = scan_source(images)
    scan_us = (time.process_time() - t0) / (20 * len(scan.records)) * 1e6
    n = 200_000
    records = [SourceRecord(path=Path(f"/data/in21k/n{i % 21841:08d}/n{i % 21841:08d}_{i}.JPEG"),
                            name=f"n{i % 21841:08d}/n{i % 21841:08d}_{i}.JPEG", labels=(f"n{i % 21841:08d}",),
                            size=110_000 + i % 5000, mtime_ns=1_700_000_000_000_000_000 + i) for i in range(n)]
    big = SourceScan(records=records, classes=sorted({r.labels[0] for r in records}), multi_label=False)
    t0 = time.process_time()
    plan_shards(big, "/out", EncodeOptions(512, 90), 1000, None, 0.0, 0)
    plan_us = (time.process_time() - t0) / n * 1e6
    t0 = time.process_time()
    listing_fingerprint(big)
    fp_us = (time.process_time() - t0) / n * 1e6
    rec = {"scan_us_per_record_local_cached": round(scan_us, 2), "plan_us_per_record": round(plan_us, 2),
           "fingerprint_us_per_record": round(fp_us, 2), "records_for_plan": n}
    print(f"listing: scan {scan_us:.1f} us/record (local, cached), plan {plan_us:.1f}, fingerprint {fp_us:.1f}",
          flush=True)
    return rec


def _write_wds(folder: Path, samples: list[tuple[str, bytes]], per_shard: int) -> None:
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "val-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, data in samples:
            sink.write({"__key__": key, "jpg": data, "cls": 0})


def _pr(doc: dict, copies: dict[str, str], train_keys: list[str], eval_hashes: dict, train_hashes: dict) -> dict:
    """Precision / recall at every threshold, from the hashes (the same ones dedup computes)."""
    ev_keys = list(eval_hashes)
    ev = np.array([eval_hashes[k] for k in ev_keys], dtype=np.uint64)
    out = {}
    for t in THRESHOLDS:
        hits = set()
        for key in train_keys:
            d = np.bitwise_count(np.uint64(train_hashes[key]) ^ ev)
            if d.min() <= t:
                hits.add(key)
        true = len([k for k in hits if k in copies])
        out[t] = {"precision": round(true / max(1, len(hits)), 4), "recall": round(true / len(copies), 4),
                  "found": len(hits), "false": len(hits) - true}
    assert out[doc["threshold"]]["found"] == len(doc["excluded"]), "dedup.json disagrees with the hashes"
    return out


def _dedup_case(name: str, work: Path, originals: list[tuple[str, bytes]], copied: int,
                others: list[tuple[str, bytes]], seed: int, workers: int) -> dict:
    """VAL = ``originals`` (shards), TRAIN = near-copies of the first ``copied`` of them (equal
    numbers of each kind) and ``others``, written with shards write; then shards dedup, timed."""
    rng = np.random.default_rng(seed)
    val, src, train = work / f"{name}-val", work / f"{name}-img", work / f"{name}-train"
    _write_wds(val, originals, 50)
    copies = {}
    for i, (key, data) in enumerate(originals[:copied]):
        kind = KINDS[i % len(KINDS)]
        img, quality = near_copy(Image.open(io.BytesIO(data)).convert("RGB"), kind, rng)
        path = src / "copy" / f"{kind}_{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(img, quality))
        copies[sanitize_key(f"copy/{kind}_{key}.jpg")] = key
    for key, data in others:
        (src / "other").mkdir(parents=True, exist_ok=True)
        (src / "other" / f"{key}.jpg").write_bytes(data)
    _wait([_vitscale("shards", "write", str(src), str(train), "--samples-per-shard", "50", "--no-progress")])
    images = len(originals) + len(copies) + len(others)
    cpu0, t0 = _children_cpu(), time.perf_counter()
    _wait([_vitscale("shards", "dedup", str(train), "--against", str(val), "--workers", str(workers),
                     "--no-progress")])
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    doc = json.loads((train / "dedup.json").read_text())
    train_hashes = {sanitize_key(f"{p.parent.name}/{p.name}"): perceptual_hash(p.read_bytes())
                    for p in src.rglob("*.jpg")}
    eval_hashes = {key: perceptual_hash(data) for key, data in originals}
    pr = _pr(doc, copies, list(train_hashes), eval_hashes, train_hashes)
    at = pr[doc["threshold"]]
    print(f"dedup {name}: {images} images hashed in {wall:.1f} s wall, {images / cpu:.0f} img/s per core "
          f"(process start and pool included); threshold {doc['threshold']}: precision {at['precision']}, "
          f"recall {at['recall']}", flush=True)
    return {"images_hashed": images, "eval_images": len(originals), "train_images": len(copies) + len(others),
            "near_copies": len(copies), "workers": workers, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "images_per_s": round(images / wall, 1), "images_per_s_per_core": round(images / cpu, 1),
            "threshold": doc["threshold"], "precision_recall": pr,
            "nearest_distance_histogram": doc["nearest_distance_histogram"][:20]}


def bench_hash_only(images: Path) -> dict:
    """In-process pHash cost per image (one core), without process start: the steady-state rate."""
    datas = [p.read_bytes() for p in sorted(images.rglob("*")) if p.is_file()]
    for d in datas[:10]:
        perceptual_hash(d)
    t0 = time.process_time()
    for d in datas:
        perceptual_hash(d)
    us = (time.process_time() - t0) / len(datas) * 1e6
    hashes = np.array([perceptual_hash(d) for d in datas], dtype=np.uint64)
    pairs = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[np.triu_indices(len(hashes), 1)]
    print(f"pHash in one process: {us:.0f} us per ImageNet image ({1e6 / us:.0f} images/s per core); "
          f"{len(pairs)} pairs of distinct images: smallest distance {pairs.min()}, mean {pairs.mean():.1f}",
          flush=True)
    return {"us_per_image": round(us, 1), "images_per_s_per_core": round(1e6 / us, 1), "images": len(datas),
            "distinct_pairs": int(len(pairs)), "distinct_pair_min_distance": int(pairs.min()),
            "distinct_pair_mean_distance": round(float(pairs.mean()), 2),
            "distinct_pairs_within": {str(t): int((pairs <= t).sum()) for t in THRESHOLDS}}


def bench_match() -> dict:
    """Hamming distances per CPU second of :func:`data_tools.dedup.nearest`, what the workers run
    (8,192 training hashes against 50,000 evaluation hashes)."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2**63, 8192, dtype=np.uint64)
    ev = rng.integers(0, 2**63, IN1K_VAL, dtype=np.uint64)
    t0 = time.process_time()
    nearest(train, ev)
    per_s = len(train) * len(ev) / (time.process_time() - t0)
    print(f"matching: {per_s / 1e9:.2f} G distances per CPU second", flush=True)
    return {"distances_per_cpu_s": round(per_s), "hash_bits": HASH_SIZE * HASH_SIZE}


def extrapolate(write: dict, listing: dict, hash_only: dict, match: dict, mean_bytes: float) -> dict:
    """ImageNet-21k (14,197,122 images) on N machines of M cores, from the per-core rates here:
    CPU minutes of encoding, the listing every part repeats, and the read rate each machine's
    storage must sustain for the CPUs to be the limit (source bytes per image as in the sample)."""
    out: dict = {"images": IN21K_IMAGES, "mean_source_bytes": round(mean_bytes)}
    per_record = (listing["scan_us_per_record_local_cached"] + listing["plan_us_per_record"]
                  + listing["fingerprint_us_per_record"]) * 1e-6
    out["listing_min_per_part_local_disk"] = round(IN21K_IMAGES * per_record / 60, 1)
    for mode in ("copy", "reencode"):
        rate = write[mode]["one process, 1 worker"]["marginal_images_per_s_per_core"]
        rows = {}
        for machines, cores in ((1, 32), (4, 32), (16, 32), (64, 32)):
            rows[f"{machines} x {cores} cores"] = {
                "encode_min": round(IN21K_IMAGES / (rate * machines * cores) / 60, 1),
                "read_MB_per_s_per_machine": round(rate * cores * mean_bytes / 1e6)}
        out[mode] = {"images_per_s_per_core": rate, "machines": rows}
    per_image = 1 / hash_only["images_per_s_per_core"] + IN1K_VAL / match["distances_per_cpu_s"]
    out["dedup_vs_imagenet_val_50k"] = {
        "cpu_h": round(IN21K_IMAGES * per_image / 3600, 1),
        "hash_cpu_h": round(IN21K_IMAGES / hash_only["images_per_s_per_core"] / 3600, 1),
        "match_cpu_h": round(IN21K_IMAGES * IN1K_VAL / match["distances_per_cpu_s"] / 3600, 1),
        "min_on_32_cores": round(IN21K_IMAGES * per_image / 32 / 60, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="ImageFolder of real JPEGs (imagenet-sample)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "usable_cores": available_cpus(),
               "cpu_count": os.cpu_count(), "python": platform.python_version(), "pillow": Image.__version__,
               "numpy": np.__version__, "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    machine["cpu"] = names[0] if names else machine["cpu"]
    import imagehash

    machine["imagehash"] = imagehash.__version__
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        write = bench_write(args.images, work, args.repeats, args.samples_per_shard)
        listing = bench_listing(args.images)
        files = sorted(p for p in args.images.rglob("*") if p.is_file())
        real = [(p.stem, p.read_bytes()) for p in files]
        dedup_real = _dedup_case("imagenet", work, real[:100], 100, real[100:], seed=1, workers=available_cpus())
        drawn = [(f"val_{i:04d}", _jpeg(natural_image(i))) for i in range(60)]
        others = [(f"img_{i:04d}", _jpeg(natural_image(1000 + i))) for i in range(200)]
        dedup_drawn = _dedup_case("drawn", work, drawn, 40, others, seed=7, workers=available_cpus())
    hash_only = bench_hash_only(args.images)
    mean_bytes = statistics.mean(p.stat().st_size for p in args.images.rglob("*") if p.is_file())
    match = bench_match()
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"benchmark": "bench/shards_tools.py", "date": datetime.date.today().isoformat(), "machine": machine,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "write": write, "listing": listing,
              "dedup_imagenet": dedup_real, "dedup_drawn": dedup_drawn, "hash_only": hash_only, "match": match,
              "imagenet21k_estimate": extrapolate(write, listing, hash_only, match, mean_bytes)}
    slug = f"cpu-{available_cpus()}core-shards"
    path, n = args.out / f"{slug}-{result['date']}.json", 2
    while path.exists():
        path, n = args.out / f"{slug}-{result['date']}-{n}.json", n + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["imagenet21k_estimate"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
