"""What ``shards verify``, ``shards stats`` and ``shards index`` see of a shard set, indexed or not.

A *catalog* lists a set's shards by split, with what is known of each (samples, bytes, SHA-256
from an ``index.json``), whether the labels are multi-label, and the class count and names when
known. :func:`open_catalog` takes what ``data.train`` takes (a folder written by ``shards write``
or indexed by ``shards index``, a folder of tars without an index, a brace pattern, a glob, URLs,
a comma list; see :mod:`pretrain.data.shard_sets`). For a set without an index the label kind is
read off its first samples and the class count is unknown (labels must be non-negative integers;
the report gives the range found); tars named ``SPLIT-NNNNNN.tar`` are grouped by that split,
others go to split ``train``.

:func:`write_index` is ``vitscale shards index``: it reads every shard of a local third-party set
once (sample count, bytes, SHA-256, labels) and writes ``index.json`` beside them, without
changing a byte of the shards, so later runs, preflight and verify need no scan.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.parallel import default_workers, map_with_progress
from pretrain.core.errors import UserError
from pretrain.core.files import sha256_file, write_atomic
from pretrain.data.shard_sets import resolve_shards, split_sources
from pretrain.data.shards import (
    CLASSES_FILE,
    INDEX_FILE,
    INDEX_VERSION,
    SHARD_FILE,
    LabelError,
    ShardReadError,
    decode_label,
    index_entries,
    is_remote,
    iter_tar_samples,
    load_index,
    read_class_table,
)

ANY_CLASS = 1 << 31  # the label bound of a set whose class count is unknown


@dataclass
class Catalog:
    """A shard set as the offline tools see it. ``entries``: ``(split, entry)`` with ``url`` and,
    from an index, ``samples`` / ``bytes`` / ``sha256``."""

    name: str
    entries: list[tuple[str, dict]]
    multi_label: bool
    num_classes: int | None
    classes: list[str] | None = None
    indexed: bool = True
    notes: list[str] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)

    @property
    def label_bound(self) -> int:
        return self.num_classes if self.num_classes is not None else ANY_CLASS


def open_catalog(spec: str | Path, label_key: str | None = None) -> Catalog:
    """The catalog of ``spec`` (see the module docstring); :class:`UserError` when it names no shards."""
    spec = str(spec)
    path = Path(spec)
    if not is_remote(spec) and path.is_dir() and (path / INDEX_FILE).is_file():
        index = load_index(path)
        entries = [(split, {**e, "url": str(path / e["file"])}) for split, e in index_entries(index)]
        names = path / index.get("classes_file", CLASSES_FILE)
        classes = read_class_table(names) if names.is_file() else None
        return Catalog(path.name, entries, bool(index["multi_label"]), int(index["num_classes"]), classes,
                       splits=index["splits"])
    t0 = time.perf_counter()
    shards = resolve_shards(spec, key="SET", samples_per_epoch=1 << 40)
    entries = [(_split_of(url), {"url": url, "file": url.rsplit("/", 1)[-1]}) for url in shards.urls]
    multi = detect_multi_label(shards.urls[0], label_key)
    note = (f"{spec}: no {INDEX_FILE}; {len(shards.urls)} shards listed in {time.perf_counter() - t0:.1f} s and read "
            f"in full below (`vitscale shards index` writes an index once)")
    return Catalog(path.name if path.is_dir() else spec, entries, multi, None, None, indexed=False, notes=[note])


def _split_of(url: str) -> str:
    match = SHARD_FILE.match(url.rsplit("/", 1)[-1])
    return match.group("split") if match else "train"


def detect_multi_label(url: str, label_key: str | None) -> bool:
    """Whether a set without an index is multi-label, from its first samples: single-label when
    one reads as such (``.cls``, integer ``.txt``, ``.json`` ``label``), multi-label when one has
    a ``.json`` ``labels`` list, else single-label (the checks then report the missing labels)."""
    samples = iter_tar_samples(url)
    try:
        for n, sample in enumerate(samples):
            for multi in (False, True):
                try:
                    decode_label(sample.files, ANY_CLASS, multi, label_key)
                    return multi
                except LabelError:
                    pass
            if n >= 15:
                break
    except ShardReadError:
        pass
    finally:
        samples.close()
    return False


# ---- shards index ----

@dataclass(frozen=True)
class _IndexJob:
    url: str
    multi_label: bool
    label_key: str | None


def _index_shard(job: _IndexJob) -> dict:
    """One shard's index entry plus its label tally (runs in a worker)."""
    path = Path(job.url)
    samples, labels, unlabelled, problem = 0, Counter(), 0, None
    try:
        for sample in iter_tar_samples(path, check_end=True):
            samples += 1
            try:
                value = decode_label(sample.files, ANY_CLASS, job.multi_label, job.label_key)
                labels.update(value if job.multi_label else [value])
            except LabelError:
                unlabelled += 1
    except ShardReadError as err:
        problem = str(err)
    return {"file": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "labels": dict(labels), "unlabelled": unlabelled, "problem": problem}


def _numbered(job: tuple[int, _IndexJob]) -> tuple[int, dict]:
    return job[0], _index_shard(job[1])


def write_index(spec: str, split: str = "train", label_key: str | None = None, workers: int | None = None,
                force: bool = False, progress: bool = True) -> dict:
    """Index the local third-party shards ``spec`` names as split ``split`` (see the module
    docstring); returns the index written. Refuses remote sets (an index lives beside its shards),
    shards spread over several folders, a damaged shard, and replacing a split already indexed
    unless ``force``."""
    parts = split_sources(spec)
    if any(is_remote(p) for p in parts):
        raise UserError(f"{spec}: `vitscale shards index` writes index.json beside the shards, so it needs local "
                        f"files; index a local copy, or train from URLs with data.samples_per_epoch")
    shards = resolve_shards(spec, key="SET", samples_per_epoch=1 << 40)
    folders = {str(Path(u).parent) for u in shards.urls}
    if len(folders) != 1:
        raise UserError(f"{spec}: the shards lie in {len(folders)} folders; index each folder on its own")
    folder = Path(folders.pop())
    index_path = folder / INDEX_FILE
    index = load_index(folder) if index_path.is_file() else None
    if index is not None and split in index["splits"] and not force:
        raise UserError(f"{index_path} already indexes split {split!r}; name another split with --split, or "
                        f"re-index it with --force")
    multi = detect_multi_label(shards.urls[0], label_key)
    if index is not None and bool(index["multi_label"]) != multi:
        raise UserError(f"{spec}: these shards are {'multi' if multi else 'single'}-label but {index_path} indexes "
                        f"{'multi' if index['multi_label'] else 'single'}-label ones; keep such sets in separate "
                        f"folders")
    jobs = [(i, _IndexJob(u, multi, label_key)) for i, u in enumerate(shards.urls)]
    done = map_with_progress(_numbered, jobs, workers or default_workers(), list(shards.counts),
                             desc=f"indexing {folder.name}", show=progress)
    entries = [e for _, e in sorted(done, key=lambda ie: ie[0])]
    bad = [e for e in entries if e["problem"]]
    if bad:
        raise UserError(f"{len(bad)} shard(s) cannot be read to their end, e.g. {bad[0]['file']}: {bad[0]['problem']}; "
                        f"nothing was written. Check them with `vitscale shards verify {spec}`")
    labels: Counter = Counter()
    for e in entries:
        labels.update({int(k): n for k, n in e["labels"].items()})
    unlabelled = sum(e["unlabelled"] for e in entries)
    if not labels:
        raise UserError(f"{spec}: no sample has a label vitscale can read (.cls, an integer .txt, or a .json "
                        f"'label' / 'labels' field; another field with --label-key); nothing was written")
    table = folder / (index or {}).get("classes_file", CLASSES_FILE)
    if table.is_file():  # the set's class table fixes the class count; labels beyond it stay out of range
        num_classes = len(read_class_table(table))
        beyond = sum(n for label, n in labels.items() if label >= num_classes)
        if beyond:
            print(f"warning: {beyond} samples have labels beyond the {num_classes} classes of {table} (training counts "
                  f"them as label_out_of_range)", file=sys.stderr)
    else:
        num_classes = max(max(labels) + 1, int((index or {}).get("num_classes", 0)))
    index = index or {"version": INDEX_VERSION, "multi_label": multi, "num_classes": num_classes, "splits": {},
                      "skipped": 0, "options": {}}
    index["num_classes"] = num_classes
    index["splits"][split] = {
        "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
        "shards": [{k: e[k] for k in ("file", "samples", "bytes", "sha256")} for e in entries],
        "label_counts": {str(k): labels[k] for k in sorted(labels)}, "unlabelled": unlabelled}
    index.setdefault("options", {})[f"index_{split}"] = {"written_by": "vitscale shards index", "label_key": label_key}
    write_atomic(index_path, json.dumps(index, indent=1))
    return index


def format_index(index: dict, split: str, folder: Path, seconds: float) -> str:
    info = index["splits"][split]
    kind = "multi-label" if index["multi_label"] else "single-label"
    line = (f"indexed {folder / INDEX_FILE}: split {split} {info['samples']} samples in {len(info['shards'])} shards "
            f"({info['bytes'] / 1e6:.1f} MB), {len(info['label_counts'])} distinct labels, {index['num_classes']} "
            f"classes ({kind}) in {seconds:.1f} s; the shards were not changed")
    if info["unlabelled"]:
        line += f"\nwarning: {info['unlabelled']} samples have no readable label (training counts them as lost)"
    return line
