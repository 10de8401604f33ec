"""``vitscale shards stats OUT``: what a shard folder holds, from the shards themselves.

Reads every sample's label and image header (PIL opens lazily, so no pixel is decoded):
samples per split, the class histogram (top and bottom 10), image width/height
min/median/max, and for multi-label data the number of labels per image.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_tools.catalog import Catalog, open_catalog
from data_tools.parallel import default_workers, map_with_progress
from pretrain.data.shards import SampleError, ShardReadError, decode_label, iter_tar_samples

_TOP = 10


@dataclass
class ShardStats:
    """Per-shard tallies, merged by :func:`collect_stats`."""

    samples: int = 0
    label_counts: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    labels_per_image: list[int] = field(default_factory=list)
    unreadable: int = 0


def _labels(files: dict[str, bytes], multi_label: bool, num_classes: int,
            label_key: str | None = None) -> list[int] | None:
    try:
        value = decode_label(files, num_classes, multi_label, label_key)
    except SampleError:
        return None
    return value if multi_label else [value]


def shard_stats(args: tuple[str, bool, int, str | None]) -> ShardStats:
    """Tally one shard (runs in a worker); damaged samples count as unreadable."""
    path, multi_label, num_classes, label_key = args
    stats = ShardStats()
    try:
        for sample in iter_tar_samples(path):
            stats.samples += 1
            labels = _labels(sample.files, multi_label, num_classes, label_key)
            image = sample.image()
            try:
                if image is None or labels is None:
                    raise ValueError
                with Image.open(io.BytesIO(image[1])) as img:
                    width, height = img.size
            except Exception:  # a bad header is reported as unreadable, never raised
                stats.unreadable += 1
                continue
            stats.widths.append(width)
            stats.heights.append(height)
            stats.label_counts.update(labels)
            stats.labels_per_image.append(len(labels))
    except ShardReadError:
        stats.unreadable += 1
    return stats


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def collect_stats(out: Path | str, workers: int | None = None, progress: bool = True, label_key: str | None = None,
                  catalog: Catalog | None = None) -> dict:
    """Statistics of every split of the set ``out`` (indexed or not, see :mod:`data_tools.catalog`)
    as one JSON-able dict."""
    catalog = catalog or open_catalog(out, label_key)
    classes = catalog.classes or []
    multi_label = catalog.multi_label
    jobs, weights, split_of = [], [], []
    for split, entry in catalog.entries:
        jobs.append((entry["url"], multi_label, catalog.label_bound, label_key))
        weights.append(int(entry.get("samples", 1)))
        split_of.append(split)
    total = ShardStats()
    per_split: Counter = Counter()
    results = map_with_progress(_indexed_stats, list(enumerate(jobs)), workers or default_workers(), weights,
                                desc=f"reading {catalog.name}", show=progress)
    for i, stats in results:
        per_split[split_of[i]] += stats.samples
        total.samples += stats.samples
        total.unreadable += stats.unreadable
        total.label_counts.update(stats.label_counts)
        total.widths += stats.widths
        total.heights += stats.heights
        total.labels_per_image += stats.labels_per_image
    num_classes = catalog.num_classes if catalog.num_classes is not None else max(total.label_counts, default=-1) + 1
    name = {i: (classes[i] if i < len(classes) else str(i)) for i in range(num_classes)}
    ranked = sorted(name, key=lambda i: (-total.label_counts[i], i))

    def row(i: int) -> dict:
        return {"index": i, "name": name[i], "count": total.label_counts[i]}

    result = {
        "samples": total.samples,
        "splits": {s: {"samples": per_split[s], "shards": split_of.count(s),
                       "bytes": catalog.splits.get(s, {}).get("bytes")} for s in dict.fromkeys(split_of)},
        "num_classes": num_classes,
        "indexed": catalog.indexed,
        "notes": catalog.notes,
        "multi_label": multi_label,
        "classes_without_samples": sum(1 for i in name if total.label_counts[i] == 0),
        "top_classes": [row(i) for i in ranked[:_TOP]],
        "bottom_classes": [row(i) for i in ranked[-_TOP:][::-1]],
        "width": _spread(total.widths),
        "height": _spread(total.heights),
        "unreadable_samples": total.unreadable,
    }
    if multi_label:
        lpi = total.labels_per_image
        result["labels_per_image"] = {**_spread(lpi), "mean": (sum(lpi) / len(lpi)) if lpi else None}
    return result


def _indexed_stats(item: tuple[int, tuple[str, bool, int]]) -> tuple[int, ShardStats]:
    return item[0], shard_stats(item[1])


def format_stats(stats: dict) -> str:
    """The human-readable report of :func:`collect_stats`."""
    lines = [*stats.get("notes", []), f"samples: {stats['samples']}"]
    for split, info in stats["splits"].items():
        size = f", {info['bytes'] / 1e6:.1f} MB" if info.get("bytes") is not None else ""
        lines.append(f"  {split}: {info['samples']} samples in {info['shards']} shards{size}")
    kind = "multi-label" if stats["multi_label"] else "single-label"
    counted = "" if stats.get("indexed", True) else ", counted from the labels found (no index)"
    lines.append(f"classes: {stats['num_classes']} ({kind}{counted}), "
                 f"{stats['classes_without_samples']} without samples")
    for title, key in (("most frequent", "top_classes"), ("least frequent", "bottom_classes")):
        lines.append(f"{title}:")
        lines += [f"  {r['count']:>8}  {r['name']} ({r['index']})" for r in stats[key]]
    for dim in ("width", "height"):
        d = stats[dim]
        lines.append(f"image {dim}: min {d['min']}, median {d['median']}, max {d['max']}")
    if "labels_per_image" in stats:
        d = stats["labels_per_image"]
        mean = f"{d['mean']:.2f}" if d["mean"] is not None else "-"
        lines.append(f"labels per image: min {d['min']}, mean {mean}, median {d['median']}, max {d['max']}")
    if stats["unreadable_samples"]:
        lines.append(f"unreadable samples: {stats['unreadable_samples']} (run `vitscale shards verify`)")
    return "\n".join(lines)
