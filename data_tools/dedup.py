"""``vitscale shards dedup TRAIN --against VAL``: find training images that are near-copies of
evaluation images, and write the list the training loader leaves out.

**Hash.** The perceptual hash of the maintained ``imagehash`` library, ``imagehash.phash``:
the image in grayscale, resized to 32x32 (LANCZOS), a 2-D DCT, and the 8x8 lowest frequencies
compared with their median: 64 bits. Resizing, JPEG re-encoding and brightness changes move few of
those bits; a different image differs in about half (32) of them. Images are decoded by Pillow; a
JPEG in draft mode (luma only, at the largest DCT-domain reduction that keeps it at least 32 px on
each side), which gives the hash of the same 32x32 picture at a fraction of a full decode's cost.
Both sides are hashed the same way, so the draft decode changes no comparison.

**Match.** A training image is a near-duplicate when the Hamming distance from its hash to the
nearest evaluation image's hash is at most ``threshold`` (default :data:`DEFAULT_THRESHOLD`). Every
training hash is compared with every evaluation hash (XOR + popcount over numpy arrays, in the
workers, shard by shard), so the result is exact; the cost grows with train x eval images.

**Flow.** The evaluation sets are hashed first (their hashes stay in memory: 8 bytes and a key per
image), then the training set streams through the workers shard by shard, each shard hashed and
matched where it is read; only matches and a histogram come back. Any WebDataset set works on both
sides (:func:`data_tools.catalog.open_catalog`: indexed folders, third-party tars, patterns, URLs);
remote shards are read with the loaders' retries.

**Output** ``TRAIN/dedup.json`` (:data:`pretrain.data.exclusions.DEDUP_FILE`): the excluded training
keys, each with its shard, the matching evaluation key, set and shard and the distance; the hash
settings, the threshold, each evaluation set's fingerprint (SHA-256 over its sorted ``key hash``
lines and the hash settings, so another evaluation set or hash gives another fingerprint) and the
histogram of nearest distances over all training images (to choose a threshold from).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.catalog import open_catalog
from data_tools.parallel import default_workers, map_with_progress
from pretrain.core.errors import UserError
from pretrain.core.files import write_atomic
from pretrain.data.exclusions import DEDUP_FILE
from pretrain.data.shards import SampleError, image_bytes, is_remote
from pretrain.data.stream import read_shard

DEFAULT_THRESHOLD = 10
HASH_SIZE = 8  # 8x8 DCT coefficients: 64 bits
HIGHFREQ_FACTOR = 4  # of a (8 x 4)^2 = 32x32 grayscale image
DEDUP_VERSION = 1
_CELLS = 1 << 20  # distances computed at once: 8 MB of XORs stay in cache (512 rows x 50k: 5x slower)


def hash_settings() -> dict:
    """What the hashes mean; recorded in dedup.json and part of every set fingerprint."""
    try:
        import imagehash
    except ImportError:
        raise UserError("`vitscale shards dedup` needs the imagehash library: pip install 'vitscale[dedup]' "
                        "(or pip install imagehash)") from None
    return {"method": "phash", "library": f"imagehash {imagehash.__version__}", "bits": HASH_SIZE * HASH_SIZE,
            "hash_size": HASH_SIZE, "highfreq_factor": HIGHFREQ_FACTOR,
            "decode": f"Pillow; JPEG in draft mode (luma, DCT-scaled to >= {HASH_SIZE * HIGHFREQ_FACTOR} px a side)"}


def perceptual_hash(data: bytes) -> int:
    """The 64-bit pHash of an encoded image (see the module docstring); raises on undecodable data."""
    import imagehash

    side = HASH_SIZE * HIGHFREQ_FACTOR
    with Image.open(io.BytesIO(data)) as img:
        if img.format in ("JPEG", "MPO"):
            img.draft("L", (side, side))
        bits = imagehash.phash(img, hash_size=HASH_SIZE, highfreq_factor=HIGHFREQ_FACTOR).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True)
class HashJob:
    """One shard for a worker: hash its images and, for a training shard, match them against
    ``against`` (the evaluation hashes, uint64) within ``threshold``."""

    url: str
    expected: int | None
    against: np.ndarray | None = None
    threshold: int = DEFAULT_THRESHOLD


@dataclass
class ShardHashes:
    """What a worker sends back for one shard. Evaluation shards: every key and hash. Training
    shards: the matches ``(key, eval row, distance)`` and the histogram of nearest distances."""

    url: str
    shard: str
    images: int = 0
    unreadable: Counter = field(default_factory=Counter)
    example_problem: str = ""
    keys: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    matches: list[tuple[str, int, int]] = field(default_factory=list)
    nearest: np.ndarray | None = None


def hash_shard(job: HashJob) -> ShardHashes:
    """Hash (and match) one shard; runs in a worker and never raises for damaged data: an image
    that cannot be decoded, a sample without one and samples lost to a damaged shard are counted."""
    name = job.url.rstrip("/").rsplit("/", 1)[-1]
    out = ShardHashes(url=job.url, shard=name)
    lost: dict = {}
    keys, hashes = [], []
    for sample in read_shard(job.url, job.expected, lost):
        try:
            value = perceptual_hash(image_bytes(sample))
        except SampleError as err:
            out.unreadable[err.reason] += 1
            out.example_problem = out.example_problem or f"{sample.key}: {err}"
            continue
        except Exception as err:  # any decoder failure: the image is counted, not hashed
            out.unreadable["undecodable"] += 1
            out.example_problem = out.example_problem or f"{sample.key}: {type(err).__name__}: {err}"
            continue
        keys.append(sample.key)
        hashes.append(value)
    for (reason, _), n in lost.items():
        out.unreadable[reason] += n
    out.images = len(keys)
    if job.against is None:
        out.keys, out.hashes = keys, hashes
        return out
    best, best_d = nearest(np.array(hashes, dtype=np.uint64), job.against)
    out.nearest = np.bincount(best_d, minlength=HASH_SIZE * HASH_SIZE + 1).astype(np.int64)
    for row in np.flatnonzero(best_d <= job.threshold):
        out.matches.append((keys[row], int(best[row]), int(best_d[row])))
    return out


def nearest(hashes: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``hashes`` (uint64) the row of the nearest of ``against`` (the first on a tie)
    and its Hamming distance: exact, every pair compared, a block of rows at a time."""
    rows = max(1, _CELLS // max(1, len(against)))
    best = np.zeros(len(hashes), dtype=np.int64)
    best_d = np.zeros(len(hashes), dtype=np.uint8)
    for start in range(0, len(hashes), rows):
        dist = np.bitwise_count(hashes[start:start + rows, None] ^ against[None, :])  # (rows, eval)
        best[start:start + rows] = dist.argmin(axis=1)
        best_d[start:start + rows] = dist[np.arange(len(dist)), best[start:start + rows]]
    return best, best_d


@dataclass
class SetHashes:
    """Hashes of one evaluation set: keys, shards, uint64 hashes, and how it went."""

    spec: str
    split: str
    shards: int
    keys: list[str]
    shard_of: list[str]
    hashes: np.ndarray
    unreadable: Counter
    seconds: float
    fingerprint: str = ""


def _entries(spec: str, split: str, flag: str) -> tuple[str, list[dict]]:
    """The split of ``spec`` to hash: ``split`` if the set has it, else its only split (``flag``:
    the option that names such a split, for the message)."""
    catalog = open_catalog(spec)
    splits = list(dict.fromkeys(s for s, _ in catalog.entries))
    if split in splits:
        chosen = split
    elif len(splits) == 1:
        chosen = splits[0]
    else:
        raise UserError(f"{spec}: the set has no split {split!r} (it has {', '.join(splits)}); name the one to use "
                        f"with {flag}")
    return chosen, [e for s, e in catalog.entries if s == chosen]


def _throughput(what: str, images: int, seconds: float, workers: int) -> str:
    rate = images / seconds if seconds > 0 else float("inf")
    return (f"hashed {what}: {images} images in {seconds:.1f} s ({rate:.0f} images/s, "
            f"{rate / max(1, workers):.0f} per worker)")


def hash_set(spec: str, chosen: str, entries: list[dict], workers: int, progress: bool, settings: dict) -> SetHashes:
    """Hash every image of the shards ``entries`` (split ``chosen``) of one evaluation set."""
    jobs = [HashJob(e["url"], e.get("samples")) for e in entries]
    t0 = time.perf_counter()
    keys, shard_of, hashes, unreadable = [], [], [], Counter()
    results = map_with_progress(hash_shard, jobs, workers, [j.expected or 1 for j in jobs],
                                desc=f"hashing {spec}", show=progress)
    order = {job.url: i for i, job in enumerate(jobs)}
    for result in sorted(results, key=lambda r: order[r.url]):  # the set's order, whoever finished first
        keys += result.keys
        shard_of += [result.shard] * len(result.keys)
        hashes += result.hashes
        unreadable.update(result.unreadable)
    found = SetHashes(spec, chosen, len(jobs), keys, shard_of, np.array(hashes, dtype=np.uint64), unreadable,
                      time.perf_counter() - t0)
    lines = sorted(f"{k} {h:016x}" for k, h in zip(keys, hashes, strict=True))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update("\n".join(lines).encode())
    found.fingerprint = digest.hexdigest()
    return found


@dataclass
class DedupReport:
    """The outcome of :func:`dedup`: the document written to ``path`` and the timings."""

    path: Path
    doc: dict
    train_images: int
    train_seconds: float
    against: list[SetHashes]
    workers: int
    unreadable: Counter
    example_problem: str = ""


def default_output(train: str, split: str = "train") -> Path:
    """``TRAIN/dedup.json`` beside the training shards (the loader reads it there)."""
    path = Path(train)
    if not is_remote(train) and path.is_dir():
        return path / DEDUP_FILE
    _, entries = _entries(train, split, "--train-split")
    folders = {str(Path(e["url"]).parent) for e in entries if not is_remote(e["url"])}
    if len(folders) != 1 or any(is_remote(e["url"]) for e in entries):
        raise UserError(f"TRAIN {train}: its shards are remote or in several folders, so there is no one folder "
                        f"for {DEDUP_FILE}; name the file with --output (the loader reads {DEDUP_FILE} only from "
                        f"the folder of local shards)")
    return Path(folders.pop()) / DEDUP_FILE


def dedup(train: str, against: list[str], threshold: int | None = None, workers: int | None = None,
          train_split: str = "train", against_split: str = "val", output: Path | None = None,
          progress: bool = True) -> DedupReport:
    """Hash ``against`` then ``train``, match, and write the exclusion list (see the module
    docstring); returns the report. :class:`UserError` for a set that names no shards, a missing
    split, a threshold outside 0..64, or an evaluation set without a single readable image."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if not 0 <= threshold <= HASH_SIZE * HASH_SIZE:
        raise UserError(f"--threshold {threshold}: a Hamming distance between {HASH_SIZE * HASH_SIZE}-bit hashes "
                        f"is in 0..{HASH_SIZE * HASH_SIZE} (default {DEFAULT_THRESHOLD})")
    if not against:
        raise UserError("give at least one evaluation set with --against VAL")
    settings = hash_settings()
    workers = default_workers() if workers is None else workers
    path = Path(output) if output is not None else default_output(train, train_split)
    chosen, entries = _entries(train, train_split, "--train-split")
    evals = [(spec, *_entries(spec, against_split, "--against-split")) for spec in against]
    shared = {e["url"] for e in entries} & {e["url"] for _, _, listed in evals for e in listed}
    if shared:
        raise UserError(f"TRAIN and --against share {len(shared)} shards, e.g. {sorted(shared)[0]}: every one of their "
                        f"images would match itself; name the training split and the evaluation split")
    sets = [hash_set(spec, split, listed, workers, progress, settings) for spec, split, listed in evals]
    for s in sets:
        if not len(s.hashes):
            raise UserError(f"--against {s.spec}: no image of its {s.shards} shards could be read "
                            f"({dict(s.unreadable) or 'no samples'}); check it with `vitscale shards verify`")
    all_hashes = np.concatenate([s.hashes for s in sets])
    owner = [(i, row) for i, s in enumerate(sets) for row in range(len(s.hashes))]
    jobs = [HashJob(e["url"], e.get("samples"), all_hashes, threshold) for e in entries]
    t0 = time.perf_counter()
    nearest = np.zeros(HASH_SIZE * HASH_SIZE + 1, dtype=np.int64)
    images, unreadable, excluded, problem = 0, Counter(), [], ""
    for result in map_with_progress(hash_shard, jobs, workers, [j.expected or 1 for j in jobs],
                                    desc=f"hashing {train} and matching", show=progress):
        images += result.images
        unreadable.update(result.unreadable)
        problem = problem or result.example_problem
        nearest += result.nearest
        for key, row, distance in result.matches:
            i, r = owner[row]
            excluded.append({"key": key, "shard": result.shard, "distance": distance, "eval_set": i,
                             "eval_key": sets[i].keys[r], "eval_shard": sets[i].shard_of[r]})
    seconds = time.perf_counter() - t0
    excluded.sort(key=lambda e: e["key"])
    doc = {
        "version": DEDUP_VERSION, "written_by": "vitscale shards dedup", "hash": settings, "threshold": threshold,
        "train": {"set": train, "split": chosen, "shards": len(jobs), "images": images,
                  "unreadable": dict(unreadable)},
        "against": [{"set": s.spec, "split": s.split, "shards": s.shards, "images": len(s.hashes),
                     "unreadable": dict(s.unreadable), "fingerprint": s.fingerprint} for s in sets],
        "against_fingerprint": hashlib.sha256("\n".join(s.fingerprint for s in sets).encode()).hexdigest(),
        "nearest_distance_histogram": nearest.tolist(),
        "excluded": excluded,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1))
    return DedupReport(path, doc, images, seconds, sets, workers, unreadable, problem)


def format_report(report: DedupReport, examples: int = 10) -> str:
    """What ``shards dedup`` prints: throughput, matches with example pairs, where the list went."""
    doc = report.doc
    lines = [_throughput(f"{s.spec} ({s.split})", len(s.hashes), s.seconds, report.workers)
             + (f"; unreadable: {dict(s.unreadable)}" if s.unreadable else "") for s in report.against]
    lines.append(_throughput(f"{doc['train']['set']} ({doc['train']['split']}) and matched it", report.train_images,
                             report.train_seconds, report.workers)
                 + (f"; unreadable: {dict(report.unreadable)}, e.g. {report.example_problem}"
                    if report.unreadable else ""))
    excluded, threshold = doc["excluded"], doc["threshold"]
    share = 100 * len(excluded) / max(1, report.train_images)
    lines.append(f"near-duplicates (Hamming distance <= {threshold} of 64 bits): {len(excluded)} of "
                 f"{report.train_images} training images ({share:.2f}%) match an evaluation image")
    hist = doc["nearest_distance_histogram"]
    shown = ", ".join(f"{d}: {hist[d]}" for d in range(min(len(hist), threshold + 7)) if hist[d])
    lines.append(f"nearest distance per training image (distance: images), up to {threshold + 6}: {shown or 'none'}")
    for e in sorted(excluded, key=lambda e: (e["distance"], e["key"]))[:examples]:
        lines.append(f"  train {e['key']} ({e['shard']})  ~  {doc['against'][e['eval_set']]['set']}: "
                     f"{e['eval_key']} ({e['eval_shard']})  distance {e['distance']}")
    lines.append(f"wrote {report.path}: the training loader skips these {len(excluded)} keys (counted as "
                 f"`excluded`, not as lost samples)")
    return "\n".join(lines)
