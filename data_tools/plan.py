"""Decide, before any image is decoded, which sample goes into which shard under which key.

Everything here is a pure function of the source records and the options, which is what makes
a re-run produce byte-identical shards and lets an interrupted run recognise finished shards.

* **Key**: the image's path relative to SRC (or as written in the manifest) without its
  extension, every run of characters outside ``[A-Za-z0-9_-]`` replaced by ``_``;
  ``n01440764/n01440764_tench.JPEG`` -> ``n01440764_n01440764_tench``. A key longer than 64
  characters, or shared by several images after this clean-up, is cut to 53 characters and
  gets ``_`` + the first 10 hex digits of the SHA-1 of the original path appended. A key depends
  only on its own path (unless a colliding path is added), not on a running position.
* **Split**: every sample is in the split named by ``--split`` (default ``train``); with
  ``val_fraction`` a sample is in ``val`` instead when ``sha256("split:{seed}:{key}")``, read as
  a fraction in [0, 1), is below ``val_fraction``.
* **Order**: within a split samples are sorted by ``sha256("order:{seed}:{key}")``, which mixes
  classes across shards (an ImageFolder walk would otherwise put one class per shard).
* **Shards**: consecutive runs of ``samples_per_shard`` samples; with ``max_shard_bytes`` a shard
  also closes before its size would pass the cap. Sizes come from the source files (exact when
  bytes are copied, an estimate when re-encoding, where resizing usually only shrinks them).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from data_tools.encode import EncodeOptions
from data_tools.sources import SourceScan
from pretrain.core.errors import UserError
from pretrain.data.shards import json_bytes, shard_name, tar_member_bytes

FORMAT_REVISION = 1
MAX_KEY_LEN = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_TAR_RECORD = 10240
_TAR_END = 1024


@dataclass(frozen=True, slots=True)
class PlannedSample:
    """One sample as it will be written: key, source file, and its label member contents."""

    key: str
    path: str
    cls: int | None
    meta: dict | None
    est_bytes: int
    source_size: int | None
    source_mtime_ns: int | None


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard, plus the fingerprint that names its content."""

    split: str
    index: int
    out_dir: str
    encode: EncodeOptions
    samples: tuple[PlannedSample, ...]

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the format revision, the encode options and every planned sample."""
        payload = {
            "revision": FORMAT_REVISION,
            "resize_max": self.encode.resize_max,
            "quality": self.encode.quality,
            "samples": [[s.key, s.path, s.source_size, s.source_mtime_ns, s.cls, s.meta]
                        for s in self.samples],
        }
        return hashlib.sha256(json_bytes(payload)).hexdigest()


def sanitize_key(name: str) -> str:
    """``name`` without its extension, unsafe character runs replaced by ``_`` (may be empty)."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return _UNSAFE.sub("_", stem).strip("_")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def assign_keys(names: list[str]) -> list[str]:
    """Unique WebDataset-safe keys for ``names`` (see the module docstring for the rule)."""
    base = [sanitize_key(n) or "img" for n in names]
    counts = Counter(base)
    occurrences: Counter[str] = Counter()
    keys = []
    for name, key in zip(names, base, strict=True):
        occurrences[name] += 1
        if counts[key] > 1 or len(key) > MAX_KEY_LEN:
            tag = name if occurrences[name] == 1 else f"{name}\0{occurrences[name]}"
            key = f"{key[:MAX_KEY_LEN - 11]}_{_short_hash(tag)}"
        keys.append(key)
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise UserError(f"two images map to the key {dup!r} even after adding a path hash; rename one of "
                        "them (keys are the sanitised relative path).")
    return keys


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def tar_size(member_bytes: int) -> int:
    """Size of a tar holding ``member_bytes`` of headers+data: end blocks, padded to 10 KiB records."""
    return -(-(member_bytes + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def sample_members(scan: SourceScan, labels: list[int], extra: dict | None) -> tuple[int | None, dict | None]:
    """The ``.cls`` value and ``.json`` object of a sample (None where that member is absent)."""
    if scan.multi_label:
        return None, {**(extra or {}), "labels": labels}
    return labels[0], (dict(extra) if extra else None)


def plan_shards(scan: SourceScan, out_dir: str, encode: EncodeOptions, samples_per_shard: int,
                max_shard_bytes: int | None, val_fraction: float, seed: int,
                split: str = "train") -> list[ShardTask]:
    """Shard tasks for ``scan``: the ``split`` shards first, then val (only when ``val_fraction > 0``)."""
    keys = assign_keys([r.name for r in scan.records])
    splits = (split, "val") if val_fraction > 0 else (split,)
    by_split: dict[str, list[tuple[float, PlannedSample]]] = {name: [] for name in splits}
    for key, record in zip(keys, scan.records, strict=True):
        cls, meta = sample_members(scan, scan.label_indices(record), record.extra)
        est = tar_member_bytes(record.size or 0)
        est += tar_member_bytes(len(str(cls))) if cls is not None else 0
        est += tar_member_bytes(len(json_bytes(meta))) if meta is not None else 0
        sample = PlannedSample(key=key, path=str(record.path), cls=cls, meta=meta, est_bytes=est,
                               source_size=record.size, source_mtime_ns=record.mtime_ns)
        held_out = val_fraction > 0 and unit_hash(f"split:{seed}:{key}") < val_fraction
        by_split["val" if held_out else split].append((unit_hash(f"order:{seed}:{key}"), sample))
    tasks = []
    for name in splits:
        ordered = [s for _, s in sorted(by_split[name], key=lambda t: (t[0], t[1].key))]
        for index, chunk in enumerate(_chunks(ordered, samples_per_shard, max_shard_bytes)):
            tasks.append(ShardTask(split=name, index=index, out_dir=out_dir, encode=encode, samples=chunk))
    return tasks


def _chunks(samples: list[PlannedSample], per_shard: int,
            max_bytes: int | None) -> list[tuple[PlannedSample, ...]]:
    chunks: list[tuple[PlannedSample, ...]] = []
    current: list[PlannedSample] = []
    current_bytes = 0
    for sample in samples:
        full = len(current) >= per_shard
        too_big = max_bytes is not None and tar_size(current_bytes + sample.est_bytes) > max_bytes
        if current and (full or too_big):
            chunks.append(tuple(current))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += sample.est_bytes
    if current:
        chunks.append(tuple(current))
    return chunks
