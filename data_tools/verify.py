"""``vitscale shards verify SET``: prove that every sample of a shard set can be trained on.

``SET`` is anything ``data.train`` takes (:mod:`data_tools.catalog`): a folder written by
``shards write`` or indexed by ``shards index``, a folder of third-party tars, a brace pattern,
a glob, URLs. For every shard: the file exists, its size and SHA-256 match the index (when there
is one), the tar reads to the end, every sample has exactly one decodable image and a valid
label (``.cls`` / integer ``.txt`` / ``.json`` ``label`` in range for single-label; a ``.json``
``labels`` list of in-range integers for multi-label; see :func:`pretrain.data.shards.decode_label`),
no key repeats (within or across shards), and the sample count matches the index. Without an
index the class count is unknown: labels must be non-negative and the report gives their range.
Images are decoded in full (JPEGs at 1/8 DCT scale, which still reads the whole bitstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_tools.catalog import Catalog, open_catalog
from data_tools.encode import SkipSample, decode_image
from data_tools.parallel import default_workers, map_with_progress
from pretrain.core.files import sha256_file
from pretrain.data.shards import (
    SampleError,
    ShardReadError,
    TarSample,
    decode_label,
    image_bytes,
    is_remote,
    iter_tar_samples,
)


@dataclass(frozen=True)
class ShardCheck:
    """What a worker needs to check one shard."""

    url: str
    split: str
    entry: dict
    multi_label: bool
    num_classes: int
    label_key: str | None = None


@dataclass
class ShardReport:
    """The verdict on one shard: good samples, problems (``key: reason`` or shard-level), keys seen
    (with whether that sample was good)."""

    file: str
    split: str
    samples: int = 0
    good: int = 0
    problems: list[str] = field(default_factory=list)
    keys: list[tuple[str, bool]] = field(default_factory=list)
    max_label: int = -1


def _sample_problem(sample: TarSample, check: ShardCheck, report: ShardReport) -> str | None:
    if sample.duplicate_members:
        return f"duplicate members {', '.join(sample.duplicate_members)}"
    try:
        data = image_bytes(sample)
        decode_image(data, draft_to=lambda w, h: (max(1, w // 8), max(1, h // 8)))
        label = decode_label(sample.files, check.num_classes, check.multi_label, check.label_key)
    except SkipSample as err:
        return f"undecodable image: {err}"
    except SampleError as err:
        return str(err)
    report.max_label = max(report.max_label, *(label if isinstance(label, list) else [label]))
    return None


def verify_shard(check: ShardCheck) -> ShardReport:
    """Check one shard (runs in a worker); never raises for damaged data."""
    entry = check.entry
    report = ShardReport(file=entry.get("file", "?"), split=check.split)
    path = check.url
    if not is_remote(path):
        if not Path(path).is_file():
            report.problems.append("missing shard file")
            return report
        size = Path(path).stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            report.problems.append(f"size {size} bytes, index.json says {entry['bytes']}")
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            report.problems.append("checksum mismatch (sha256 differs from index.json)")
    seen: set[str] = set()
    try:
        for sample in iter_tar_samples(path, check_end=True):
            report.samples += 1
            problem = _sample_problem(sample, check, report)
            if sample.key in seen:
                problem = "duplicate key within the shard"
            seen.add(sample.key)
            report.keys.append((sample.key, problem is None))
            if problem is None:
                report.good += 1
            else:
                report.problems.append(f"{sample.key}: {problem}")
    except ShardReadError as err:
        report.problems.append(f"truncated or corrupt tar after {report.samples} samples ({err})")
    if "samples" in entry and report.samples != entry["samples"]:
        report.problems.append(f"count mismatch: tar has {report.samples} samples, index.json says "
                               f"{entry['samples']}")
    return report


def verify(out: Path | str, workers: int | None = None, progress: bool = True, label_key: str | None = None,
           catalog: Catalog | None = None) -> tuple[list[ShardReport], int]:
    """Check every shard of the set ``out``; return the reports and the number of good samples.

    A key repeated across shards is reported on the later shard and not counted as good there.
    """
    catalog = catalog or open_catalog(out, label_key)
    checks = [ShardCheck(entry["url"], split, entry, catalog.multi_label, catalog.label_bound, label_key)
              for split, entry in catalog.entries]
    weights = [int(c.entry.get("samples", 1)) for c in checks]
    reports = list(map_with_progress(verify_shard, checks, default_workers() if workers is None else workers,
                                     weights, desc=f"verifying {catalog.name}", show=progress))
    order = {(c.split, c.entry.get("file")): i for i, c in enumerate(checks)}
    reports.sort(key=lambda r: order[(r.split, r.file)])
    owner: dict[str, str] = {}
    for report in reports:
        for key, ok in report.keys:
            if key in owner and owner[key] != report.file:
                report.problems.append(f"{key}: duplicate key (also in {owner[key]})")
                report.good -= int(ok)
            owner.setdefault(key, report.file)
    return reports, sum(r.good for r in reports)


def format_reports(reports: list[ShardReport], good: int, catalog: Catalog | None = None) -> str:
    """Human summary: every bad shard with its problems, the good samples of each split, then the
    totals (and, for a set without an index, the label range found)."""
    lines = list(catalog.notes) if catalog is not None else []
    for report in reports:
        if report.problems:
            lines.append(f"BAD {report.file} ({report.split}):")
            lines += [f"  {p}" for p in report.problems]
    for split in dict.fromkeys(r.split for r in reports):
        mine = [r for r in reports if r.split == split]
        lines.append(f"split {split}: {sum(r.good for r in mine)} good samples of {sum(r.samples for r in mine)} "
                     f"in {len(mine)} shards")
    total = sum(r.samples for r in reports)
    bad = sum(1 for r in reports if r.problems)
    if catalog is not None and catalog.num_classes is None:
        top = max((r.max_label for r in reports), default=-1)
        kind = "multi-label" if catalog.multi_label else "single-label"
        lines.append(f"labels ({kind}): 0..{top}, so model.num_classes must be at least {top + 1}" if top >= 0
                     else "labels: none readable")
    lines.append(f"{good} good samples of {total} read in {len(reports)} shards; "
                 + (f"{bad} shard(s) with problems" if bad else "all shards OK"))
    return "\n".join(lines)
