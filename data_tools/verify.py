"""``vitscale shards verify OUT``: prove that every sample of a shard folder can be trained on.

For every shard named in ``index.json``: the file exists, its size and SHA-256 match the index,
the tar reads to the end, every sample has exactly one decodable image and a valid label
(``.cls`` in range for single-label; ``.json`` with a ``labels`` list of in-range integers for
multi-label), no key repeats (within or across shards), and the sample count matches the index.
Images are decoded in full (JPEGs at 1/8 DCT scale, which still reads the whole bitstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_tools.encode import SkipSample, decode_image
from data_tools.parallel import default_workers, map_with_progress
from pretrain.core.files import sha256_file
from pretrain.data.shards import (
    SampleError,
    ShardReadError,
    TarSample,
    decode_label,
    image_bytes,
    index_entries,
    iter_tar_samples,
    load_index,
)


@dataclass(frozen=True)
class ShardCheck:
    """What a worker needs to check one shard."""

    out_dir: str
    split: str
    entry: dict
    multi_label: bool
    num_classes: int


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


def _sample_problem(sample: TarSample, check: ShardCheck) -> str | None:
    if sample.duplicate_members:
        return f"duplicate members {', '.join(sample.duplicate_members)}"
    try:
        data = image_bytes(sample)
        decode_image(data, draft_to=lambda w, h: (max(1, w // 8), max(1, h // 8)))
        decode_label(sample.files, check.num_classes, check.multi_label)
    except SkipSample as err:
        return f"undecodable image: {err}"
    except SampleError as err:
        return str(err)
    return None


def verify_shard(check: ShardCheck) -> ShardReport:
    """Check one shard (runs in a worker); never raises for damaged data."""
    entry = check.entry
    report = ShardReport(file=entry.get("file", "?"), split=check.split)
    path = Path(check.out_dir) / report.file
    if not path.is_file():
        report.problems.append("missing shard file")
        return report
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        report.problems.append(f"size {size} bytes, index.json says {entry['bytes']}")
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        report.problems.append("checksum mismatch (sha256 differs from index.json)")
    seen: set[str] = set()
    try:
        for sample in iter_tar_samples(path, check_end=True):
            report.samples += 1
            problem = _sample_problem(sample, check)
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


def verify(out: Path, workers: int | None = None, progress: bool = True) -> tuple[list[ShardReport], int]:
    """Check every shard in ``out/index.json``; return the reports and the number of good samples.

    A key repeated across shards is reported on the later shard and not counted as good there.
    """
    index = load_index(out)
    checks = [ShardCheck(str(out), split, entry, bool(index["multi_label"]), int(index["num_classes"]))
              for split, entry in index_entries(index)]
    weights = [int(c.entry.get("samples", 1)) for c in checks]
    reports = list(map_with_progress(verify_shard, checks, default_workers() if workers is None else workers,
                                     weights, desc=f"verifying {out.name}", show=progress))
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


def format_reports(reports: list[ShardReport], good: int) -> str:
    """Human summary: every bad shard with its problems, the good samples of each split, then the totals."""
    lines = []
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
    lines.append(f"{good} good samples of {total} read in {len(reports)} shards; "
                 + (f"{bad} shard(s) with problems" if bad else "all shards OK"))
    return "\n".join(lines)
