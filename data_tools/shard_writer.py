"""Write a dataset as WebDataset shards: plan, encode in parallel, resume, index.

:func:`write_shards` is the library entry point behind ``vitscale shards write``. The plan
(:mod:`data_tools.plan`) fixes every sample's key, split and shard before anything is encoded;
each shard is then one task for a worker process, written to ``OUT/.progress/<file>.partial``
and renamed into place only when complete. A sidecar ``OUT/.progress/<file>.json`` records
the shard's plan fingerprint, size, SHA-256, sample count and skipped images; a later run with the
same plan reuses a shard whose sidecar matches and whose file has the recorded size, so an
interrupted write resumes where it stopped. Shards and sidecars that the current plan does not
name (left over from a run with other options) are deleted.

Nothing a user did not mean to lose is deleted: ``OUT/.progress/source.json`` records which
source a folder holds, and writing a *different* source into a folder that already holds shards
(or into a non-empty folder ``shards write`` did not create) is refused unless ``force``; a re-run
of the same source (to resume, or with other options) goes ahead.

With ``part=(I, N)`` (``--part I/N``) the same plan is made and only part ``I``'s contiguous run of
its shards is written; the part then records itself and, when every part has, joins the records
into the same ``classes.json`` / ``skipped.jsonl`` / ``index.json`` a one-machine write gives
(:func:`merge_parts`; the bookkeeping and its guarantees are in :mod:`data_tools.parts`).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_tools import parts as part_records
from data_tools.encode import EncodeOptions, SkipSample, encode_image
from data_tools.parallel import default_workers, map_with_progress
from data_tools.plan import ShardTask, plan_shards
from data_tools.sources import scan_source, with_class_table
from pretrain.core.errors import UserError
from pretrain.core.files import sha256_file
from pretrain.data.shards import (
    CLASSES_FILE,
    INDEX_FILE,
    INDEX_VERSION,
    PROGRESS_DIR,
    SHARD_FILE,
    SKIPPED_FILE,
    SPLIT_NAME,
    add_bytes,
    json_bytes,
    read_class_table,
)

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class WriteOptions:
    """Options of ``vitscale shards write``; validated on construction (messages name the flag)."""

    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    workers: int = field(default_factory=default_workers)
    resize_max: int | None = None
    quality: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    split: str = "train"
    force: bool = False
    progress: bool = True
    classes_from: Path | None = None  # a shard folder or classes.json whose class table to use
    part: tuple[int, int] | None = None  # (I, N): write part I of N (see data_tools.parts)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise UserError(f"--samples-per-shard is {self.samples_per_shard}; it must be at least 1.")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 10240:
            raise UserError(f"--max-shard-bytes is {self.max_shard_bytes}; give at least 10240 "
                            "(a tar is at least 10 KiB), typically a few hundred MB.")
        if self.workers < 0:
            raise UserError(f"--workers is {self.workers}; use 0 or 1 for one process, N for N processes.")
        if self.resize_max is not None and self.resize_max < 1:
            raise UserError(f"--resize-max is {self.resize_max}; give the long-side cap in pixels, e.g. 512.")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise UserError(f"--quality is {self.quality}; JPEG quality must be in 1..100 (90 is typical).")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction is {self.val_fraction}; it must be in [0, 1), e.g. 0.01.")
        if not SPLIT_NAME.match(self.split):
            raise UserError(f"--split is {self.split!r}; use a lower-case name such as train, val or test.")
        if self.val_fraction > 0 and self.split == "val":
            raise UserError("--split val with --val-fraction would put both parts in one split; drop one of them.")
        if self.part is not None and not 0 <= self.part[0] < self.part[1]:
            raise UserError(f"--part {self.part[0]}/{self.part[1]}: I must be in 0..N-1 and N at least 1.")

    @property
    def encode(self) -> EncodeOptions:
        return EncodeOptions(resize_max=self.resize_max, quality=self.quality)

    @property
    def index_options(self) -> dict:
        """The options that shape the shards, as ``index.json`` records them."""
        return {"samples_per_shard": self.samples_per_shard, "max_shard_bytes": self.max_shard_bytes,
                "resize_max": self.resize_max, "quality": self.quality, "val_fraction": self.val_fraction,
                "seed": self.seed, "split": self.split}


@dataclass
class ShardResult:
    """What one written (or reused) shard holds; mirrors its sidecar."""

    split: str
    index: int
    file: str
    samples: int
    bytes: int
    sha256: str
    fingerprint: str
    skipped: list[dict]
    reused: bool = False

    def sidecar(self) -> dict:
        return {"file": self.file, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                "fingerprint": self.fingerprint, "skipped": self.skipped}


@dataclass
class WriteSummary:
    """The outcome of :func:`write_shards`: the index written, skips, and how many shards were
    reused. A part (``--part``) reports its own shards and skips; ``index`` is None until every
    part is done, and ``not_merged`` then says what is missing."""

    index: dict | None
    skipped: list[dict]
    shards_written: int
    shards_reused: int
    part: tuple[int, int] | None = None
    shards: list[str] = field(default_factory=list)
    not_merged: str | None = None

    def skip_reasons(self) -> Counter:
        return Counter(s["reason"].split(" (")[0] for s in self.skipped)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # parts may write the same file together
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(task: ShardTask) -> ShardResult:
    """Encode and write one shard (runs in a worker). Bad source images are skipped, never raised."""
    out = Path(task.out_dir)
    progress = out / PROGRESS_DIR
    partial = progress / f"{task.file}.partial"
    skipped: list[dict] = []
    written = 0
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in task.samples:
            try:
                ext, data = encode_image(Path(sample.path), task.encode)
            except SkipSample as err:
                skipped.append({"path": sample.path, "reason": str(err)})
                continue
            add_bytes(tar, f"{sample.key}.{ext}", data)
            if sample.cls is not None:
                add_bytes(tar, f"{sample.key}.cls", str(sample.cls).encode("ascii"))
            if sample.meta is not None:
                add_bytes(tar, f"{sample.key}.json", json_bytes(sample.meta))
            written += 1
    result = ShardResult(split=task.split, index=task.index, file=task.file, samples=written,
                         bytes=partial.stat().st_size, sha256=sha256_file(partial),
                         fingerprint=task.fingerprint, skipped=skipped)
    os.replace(partial, out / task.file)
    _atomic_write(progress / f"{task.file}.json", json_bytes(result.sidecar()))
    return result


def completed_shard(task: ShardTask) -> ShardResult | None:
    """The recorded result for ``task`` if its shard is complete and matches the plan, else None."""
    out = Path(task.out_dir)
    try:
        record = json.loads((out / PROGRESS_DIR / f"{task.file}.json").read_text())
        size = (out / task.file).stat().st_size
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != task.fingerprint or record.get("bytes") != size:
        return None
    return ShardResult(split=task.split, index=task.index, file=task.file, samples=record["samples"],
                       bytes=size, sha256=record["sha256"], fingerprint=task.fingerprint,
                       skipped=record.get("skipped", []), reused=True)


def _claim_out(src: Path, out: Path, force: bool) -> None:
    """Make ``out`` ours for ``src``: refuse a folder holding another dataset unless ``force``.
    Our own bookkeeping folders alone do not make ``out`` someone else's (parts that start
    together each find the others' ``.progress`` before its ``source.json`` exists)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; pass a folder (new or previously written by "
                        "`vitscale shards write`) as OUT.")
    record = out / PROGRESS_DIR / SOURCE_FILE
    me = str(src.resolve())
    ours = {PROGRESS_DIR, part_records.PARTS_DIR}
    if out.is_dir() and any(p.name not in ours for p in out.iterdir()) and not force:
        try:
            held = json.loads(record.read_text()).get("source")
        except (OSError, json.JSONDecodeError, AttributeError):
            held = None
        if held is None:
            raise UserError(f"output {out} is not empty and was not written by `vitscale shards write`; choose an "
                            f"empty or new folder, or pass --force to write into it anyway.")
        if held != me:
            raise UserError(f"output {out} holds shards of {held}, not of {src}; writing here would replace them. "
                            f"Choose another OUT, or pass --force to replace that shard set.")
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(record, json.dumps({"source": me}).encode("utf-8"))


def _remove_stale(out: Path, planned: set[str]) -> None:
    """Delete shards, done markers and partial files of shards ``planned`` does not name."""
    for path in out.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in planned:
            path.unlink(missing_ok=True)
    for suffix in (".json", ".partial"):
        for path in (out / PROGRESS_DIR).glob(f"*.tar{suffix}"):
            if path.name[: -len(suffix)] not in planned:
                path.unlink(missing_ok=True)


def build_index(results: list[ShardResult], multi_label: bool, num_classes: int, source_skipped: int,
                index_options: dict) -> dict:
    """The ``index.json`` document (see :mod:`pretrain.data.shards`); ``results`` in plan order."""
    splits: dict[str, dict] = {}
    split = index_options["split"]
    for name in (split, "val") if index_options["val_fraction"] > 0 else (split,):
        shards = [{"file": r.file, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
                  for r in results if r.split == name]
        splits[name] = {"samples": sum(s["samples"] for s in shards),
                        "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    return {
        "version": INDEX_VERSION,
        "multi_label": multi_label,
        "num_classes": num_classes,
        "classes_file": CLASSES_FILE,
        "splits": splits,
        "skipped": source_skipped + sum(len(r.skipped) for r in results),
        "options": dict(index_options),
    }


def finish_set(out: Path, results: list[ShardResult], classes: list[str], multi_label: bool,
               source_skipped: list[dict], index_options: dict) -> dict:
    """Write ``skipped.jsonl``, ``classes.json`` and, last, ``index.json`` for all the shards of a
    set (``results`` in plan order); the same bytes whether one machine or many wrote the shards.
    :class:`UserError` when no image at all could be read."""
    skipped = source_skipped + [s for r in results for s in r.skipped]
    _atomic_write(out / SKIPPED_FILE, b"".join(json_bytes(s) + b"\n" for s in skipped))
    table = {"classes": classes, "class_to_idx": {name: i for i, name in enumerate(classes)}}
    _atomic_write(out / CLASSES_FILE, json.dumps(table, indent=1).encode("utf-8"))
    index = build_index(results, multi_label, len(classes), len(source_skipped), index_options)
    total = sum(split["samples"] for split in index["splits"].values())
    if total == 0:
        images = sum(r.samples + len(r.skipped) for r in results)
        raise UserError(f"none of the {images} source images could be read; the reasons are in "
                        f"{out / SKIPPED_FILE}. Fix or replace the files and run the command again.")
    _atomic_write(out / INDEX_FILE, json.dumps(index, indent=1).encode("utf-8"))
    return index


def _plan_order(results: list[ShardResult], split: str) -> list[ShardResult]:
    return sorted(results, key=lambda r: (r.split != split, r.index))


def write_shards(src: Path, out: Path, options: WriteOptions) -> WriteSummary:
    """Write ``src`` (ImageFolder or manifest) as shards under ``out``; see the module docstring.

    Raises :class:`UserError` for a missing or empty source, a bad manifest, an ``out`` that is a
    file or holds another dataset (unless ``options.force``), or when no image at all could be
    read (the reasons are then in ``skipped.jsonl``).
    """
    src, out = Path(src), Path(out)
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"output {out} is inside the source folder {src}, where it would be read as a "
                        "class folder; choose an OUT outside SRC.")
    scan = scan_source(src)
    if options.classes_from is not None:
        scan = with_class_table(scan, read_class_table(options.classes_from), options.classes_from)
    _claim_out(src, out, options.force)
    tasks = plan_shards(scan, str(out.resolve()), options.encode, options.samples_per_shard,
                        options.max_shard_bytes, options.val_fraction, options.seed, options.split)
    if options.part is None:
        mine = tasks
        part_records.clear_records(out)
    else:
        mine = [tasks[i] for i in part_records.part_range(len(tasks), *options.part)]
        part_records.start_part(out, *options.part)
    (out / INDEX_FILE).unlink(missing_ok=True)
    if options.part is None:  # a part leaves other shards alone (they may be another part's); merge removes stale ones
        _remove_stale(out, {t.file for t in tasks})
    for task in mine:  # left by a run that was killed mid-shard (only this run's own shards: parts run together)
        (out / PROGRESS_DIR / f"{task.file}.partial").unlink(missing_ok=True)
    results: list[ShardResult] = []
    todo = []
    for task in mine:
        done = completed_shard(task)
        if done is None:
            todo.append(task)
        else:
            results.append(done)
    reused = sum(r.samples + len(r.skipped) for r in results)
    desc = f"writing {out.name}" + (f" part {options.part[0]}/{options.part[1]}" if options.part else "")
    results += map_with_progress(write_shard, todo, options.workers, [len(t.samples) for t in todo],
                                 desc=desc, initial=reused, show=options.progress)
    results = _plan_order(results, options.split)
    if options.part is None:
        index = finish_set(out, results, scan.classes, scan.multi_label, scan.skipped, options.index_options)
        return WriteSummary(index=index, skipped=scan.skipped + [s for r in results for s in r.skipped],
                            shards_written=len(todo), shards_reused=len(tasks) - len(todo))
    part, parts = options.part
    part_records.write_record(out, {
        "part": part, "parts": parts, "source": str(src.resolve()), "planned_shards": len(tasks),
        "listing": part_records.listing_fingerprint(scan),
        "settings": part_records.settings_fingerprint(options.index_options),
        "index_options": options.index_options, "classes": scan.classes, "multi_label": scan.multi_label,
        "source_skipped": scan.skipped,
        "shards": [{"split": r.split, "index": r.index, **r.sidecar()} for r in results]})
    summary = WriteSummary(index=None, skipped=[s for r in results for s in r.skipped], shards_written=len(todo),
                           shards_reused=len(mine) - len(todo), part=options.part, shards=[r.file for r in results])
    try:  # the last part to finish joins the records; until then this says what is missing
        summary.index = merge_parts(out)
    except UserError as err:
        summary.not_merged = str(err)
    return summary


def merge_parts(out: Path) -> dict:
    """``vitscale shards merge OUT``: join the records of ``shards write --part I/N`` into the set's
    ``classes.json``, ``skipped.jsonl`` and ``index.json`` (byte-identical to a one-machine write
    of the same source and options), delete shards no part wrote (left by an earlier layout), and
    return the index. :class:`UserError` (one line) while a
    part is missing, or when the parts disagree (:func:`data_tools.parts.merge_problem`). Shard
    files are checked by size here; ``shards verify`` checks their SHA-256."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; pass the OUT folder the parts wrote into")
    parts, records = part_records.read_records(out)
    problem = part_records.merge_problem(out, parts, records)
    if problem is not None:
        raise UserError(f"cannot merge {out}: {problem}")
    first = records[0]
    fields = ("split", "index", "file", "samples", "bytes", "sha256", "fingerprint", "skipped")
    results = [ShardResult(**{k: shard[k] for k in fields}) for i in range(parts) for shard in records[i]["shards"]]
    options = first["index_options"]
    _remove_stale(out, {r.file for r in results})
    return finish_set(out, _plan_order(results, options["split"]), first["classes"], first["multi_label"],
                      first["source_skipped"], options)
