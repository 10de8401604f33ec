"""One shard set written by many machines: the bookkeeping of ``shards write --part I/N``.

Why this gives the same bytes as one machine: every part scans the whole source (the listing is
sorted, :mod:`data_tools.sources`) and plans every shard of the set (:mod:`data_tools.plan`: keys,
split, order and shard boundaries are pure functions of the listing and the options), so shard
``k`` holds the same samples whatever ``N`` is, and the class table is the one of the whole listing.
Part ``I`` then writes the contiguous run of planned shards :func:`part_range` gives it (train
shards first, then val), so parts never write the same file, and no part needs to hear from another.

Each part ends by writing its *record*, ``OUT/_parts/part-I-of-N.json`` (atomically, so a record
that exists is complete): the shards it wrote with their size, SHA-256 and skipped images, the
class table, the source rows skipped before planning, the index settings and two fingerprints:

* ``listing``: SHA-256 over the sorted source records (relative name, size, mtime, labels, extra
  manifest fields), the class table, the label kind and the rows skipped while scanning;
* ``settings``: the options that shape the plan (``samples_per_shard``, ``max_shard_bytes``,
  ``resize_max``, ``quality``, ``val_fraction``, ``seed``, ``split``) and the plan's revision.

Joining the records (``shards merge``, or the last part to finish) is refused while a part is
missing, when a part was written from another listing or with other settings, or when a shard a
record names is gone or has another size (:func:`merge_problem`). Per-shard done markers
(``OUT/.progress/<shard>.json``) are the writer's own; they make every part resumable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from data_tools.plan import FORMAT_REVISION
from data_tools.sources import SourceScan
from pretrain.core.errors import UserError
from pretrain.data.shards import json_bytes

PARTS_DIR = "_parts"
_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_RECORD = re.compile(r"^part-(\d+)-of-(\d+)\.json$")
RECORD_VERSION = 1


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (SLURM array ids start at 0)."""
    match = _PART.match(str(text))
    if match is None:
        raise UserError(f"--part {text!r}: write it as I/N, part I (counted from 0) of N, e.g. --part 0/8 "
                        f"or --part $SLURM_ARRAY_TASK_ID/8")
    part, parts = int(match.group(1)), int(match.group(2))
    if parts < 1 or part >= parts:
        raise UserError(f"--part {text}: I must be in 0..N-1 (0..{max(parts - 1, 0)} here) and N at least 1")
    return part, parts


def part_range(total: int, part: int, parts: int) -> range:
    """The planned shards (positions in the plan) part ``part`` of ``parts`` writes: contiguous,
    disjoint, together all ``total``, sizes differing by at most one."""
    return range(total * part // parts, total * (part + 1) // parts)


def record_path(out: Path, part: int, parts: int) -> Path:
    return Path(out) / PARTS_DIR / f"part-{part}-of-{parts}.json"


def listing_fingerprint(scan: SourceScan) -> str:
    """SHA-256 over what the plan reads of the source (see the module docstring); absolute paths
    are left out, so parts that mount the source elsewhere agree."""
    digest = hashlib.sha256()
    for r in scan.records:
        digest.update(json_bytes([r.name, r.size, r.mtime_ns, list(r.labels), r.extra]) + b"\n")
    digest.update(json_bytes({"classes": scan.classes, "multi_label": scan.multi_label, "skipped": scan.skipped}))
    return digest.hexdigest()


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json_bytes({**settings, "revision": FORMAT_REVISION})).hexdigest()


def _records_on_disk(out: Path) -> dict[tuple[int, int], Path]:
    folder = Path(out) / PARTS_DIR
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _RECORD.match(path.name)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def start_part(out: Path, part: int, parts: int) -> None:
    """Before part ``part`` writes: drop its own old record (it is no longer done) and the records
    of a split into another number of parts (a new layout; the shards stay valid)."""
    for (i, n), path in _records_on_disk(out).items():
        if i == part or n != parts:
            path.unlink(missing_ok=True)


def clear_records(out: Path) -> None:
    """A one-machine write replaces whatever parts wrote before."""
    for path in _records_on_disk(out).values():
        path.unlink(missing_ok=True)


def write_record(out: Path, record: dict) -> Path:
    """Write a part's record atomically (a unique temporary name: parts may finish together)."""
    path = record_path(out, record["part"], record["parts"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(json.dumps({"version": RECORD_VERSION, **record}, indent=1).encode("utf-8"))
    os.replace(tmp, path)
    return path


def read_records(out: Path) -> tuple[int, dict[int, dict]]:
    """``(N, {part: record})`` of the parts written into ``out``; :class:`UserError` when there is
    none, or records of several ``N``."""
    found = _records_on_disk(out)
    counts = sorted({n for _, n in found})
    if not counts:
        raise UserError(f"{out} holds no part records ({PARTS_DIR}/part-I-of-N.json); write the parts first with "
                        f"`vitscale shards write SRC {out} --part I/N`")
    if len(counts) > 1:
        raise UserError(f"{out}/{PARTS_DIR} holds records of splits into {', '.join(map(str, counts))} parts; "
                        f"re-run every part of one split (a part run removes records of other splits)")
    parts = counts[0]
    records = {}
    for (i, _), path in sorted(found.items()):
        try:
            records[i] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path} cannot be read ({err}); re-run that part") from None
    return parts, records


def merge_problem(out: Path, parts: int, records: dict[int, dict]) -> str | None:
    """Why the records cannot be joined yet (one line), or None. Checks: every part is there,
    all come from the same listing and settings, each wrote the shards of its range, and those
    shard files exist with the recorded sizes."""
    missing = [i for i in range(parts) if i not in records]
    if missing:
        listed = ", ".join(f"{i}/{parts}" for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
        return (f"{len(missing)} of {parts} parts have not finished: {listed} (each part records itself in "
                f"{Path(out) / PARTS_DIR} when done); run them with `vitscale shards write SRC {out} --part I/{parts}`")
    first = records[0]
    for i in range(1, parts):
        rec = records[i]
        for field, what in (("listing", "another source listing"), ("settings", "other write options")):
            if rec.get(field) != first.get(field):
                detail = ""
                if field == "settings":
                    diff = sorted(k for k in {*rec["index_options"], *first["index_options"]}
                                  if rec["index_options"].get(k) != first["index_options"].get(k))
                    detail = "; " + ", ".join(f"{k} {first['index_options'].get(k)} vs {rec['index_options'].get(k)}"
                                              for k in diff)
                return (f"part {i}/{parts} was written from {what} than part 0/{parts} ({field} "
                        f"{str(rec.get(field))[:12]} vs {str(first.get(field))[:12]}{detail}); re-run the parts "
                        f"written from the old one with the same SRC and options")
    for i in range(parts):
        rec = records[i]
        want = len(part_range(int(rec["planned_shards"]), i, parts))
        if len(rec["shards"]) != want:
            return f"part {i}/{parts} records {len(rec['shards'])} shards, its range holds {want}; re-run it"
        for shard in rec["shards"]:
            path = Path(out) / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                found = "is missing" if size is None else f"has {size} bytes, not {shard['bytes']}"
                return (f"{path} (part {i}/{parts}) {found}; re-run `vitscale shards write SRC {out} "
                        f"--part {i}/{parts}`, which rewrites it")
    return None
