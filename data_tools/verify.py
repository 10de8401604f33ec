"""``vitscale shards verify OUT``: prove that every sample of a shard folder can be trained on.

For every shard named in ``index.json``: the file exists, its size and SHA-256 match the index,
the tar reads to the end, every sample has exactly one decodable image and a valid label
(``.cls`` in range for single-label; ``.json`` with a ``labels`` list of in-range integers for
multi-label), no key repeats (within or across shards), and the sample count matches the index.
Images are decoded in full (JPEGs at 1/8 DCT scale, which still reads the whole bitstream).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.encode import SkipSample, decode_image
from data_tools.parallel import default_workers, map_with_progress
from pretrain.data.shards import TarSample, iter_tar_samples, load_index, sha256_file


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


def _label_problem(sample: TarSample, multi_label: bool, num_classes: int) -> str | None:
    if multi_label:
        if "json" not in sample.files:
            return "missing label (no .json)"
        try:
            labels = json.loads(sample.files["json"]).get("labels")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "unreadable .json"
        if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
            return "missing label (.json has no integer 'labels' list)"
        values = labels
    else:
        if "cls" not in sample.files:
            return "missing label (no .cls)"
        try:
            values = [int(sample.files["cls"].decode("ascii").strip())]
        except (UnicodeDecodeError, ValueError):
            return f"bad label (.cls is {sample.files['cls'][:20]!r})"
    bad = [v for v in values if not 0 <= v < num_classes]
    return f"label {bad[0]} out of range [0, {num_classes})" if bad else None


def _sample_problem(sample: TarSample, check: ShardCheck) -> str | None:
    if sample.duplicate_members:
        return f"duplicate members {', '.join(sample.duplicate_members)}"
    image = sample.image()
    if image is None:
        return f"no image (members: {', '.join(sorted(sample.files)) or 'none'})"
    try:
        decode_image(image[1], draft_to=lambda w, h: (max(1, w // 8), max(1, h // 8)))
    except SkipSample as err:
        return f"undecodable image: {err}"
    return _label_problem(sample, check.multi_label, check.num_classes)


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
        for sample in iter_tar_samples(path):
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
    except (tarfile.TarError, EOFError, OSError) as err:
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
              for split, info in index["splits"].items() for entry in info.get("shards", [])]
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
    """Human summary: every bad shard with its problems, then the totals."""
    lines = []
    for report in reports:
        if report.problems:
            lines.append(f"BAD {report.file} ({report.split}):")
            lines += [f"  {p}" for p in report.problems]
    total = sum(r.samples for r in reports)
    bad = sum(1 for r in reports if r.problems)
    lines.append(f"{good} good samples of {total} read in {len(reports)} shards; "
                 + (f"{bad} shard(s) with problems" if bad else "all shards OK"))
    return "\n".join(lines)
