"""Shard sets as users name them: what ``data.train``, ``data.val``, ``vitscale evaluate --data``,
the few-shot sets and ``vitscale bench loader --shards`` take, resolved the same way everywhere
(the loaders, preflight, the benchmark), on top of the format in :mod:`pretrain.data.shards`.

Accepted (:func:`resolve_shards`):

- a folder written by ``shards write``: its index names the shards and counts of the requested
  split. A folder holding a single split serves any request, so ImageNet's ``train/`` and ``val/``
  folders sharded separately work as ``data.train`` and ``data.val`` (the set's ``notes`` say so);
- a folder of ``.tar`` files without an index (counted from their tar headers);
- a brace pattern (``/data/in21k-{000000..012345}.tar``) or a glob (``/data/in21k-*.tar``) of
  local tars (counted from their tar headers);
- URLs WebDataset opens (``pipe:``, ``s3://``, ``http(s)://``, ``gs://``), counted from
  ``data.samples_per_epoch``;
- a comma-separated list of any of these (a comma inside braces belongs to the pattern).
"""

from __future__ import annotations

import contextlib
import glob
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.data.shards import (
    CLASSES_FILE,
    INDEX_FILE,
    LabelError,
    ShardReadError,
    count_tar_samples,
    decode_label,
    is_remote,
    iter_tar_samples,
    load_index,
    open_stream,
    read_class_table,
    shard_label,
)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one data source, in their listed order, with what is known about them."""

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, when known
    multi_label: bool | None = None  # known from an index
    num_classes: int | None = None  # known from an index
    notes: tuple[str, ...] = ()  # how a split was chosen, for the log
    classes: tuple[str, ...] | None = None  # class names by index, known from classes.json
    estimated: bool = False  # counts are data.samples_per_epoch spread evenly, not read from an index

    @property
    def samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def split_sources(spec: str) -> list[str]:
    """``spec`` split at commas outside braces: ``a-{0..3}.tar,b/`` -> ``["a-{0..3}.tar", "b/"]``."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(spec):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _from_index(folder: Path, split: str, key: str) -> ShardSet:
    index = load_index(folder)
    splits = {name: info for name, info in index["splits"].items() if info.get("shards")}
    notes: tuple[str, ...] = ()
    if split in splits:
        chosen = split
    elif len(splits) == 1:
        chosen = next(iter(splits))
        notes = (f"{key}={folder}: no {split!r} split there, so its only split {chosen!r} is used",)
    else:
        have = ", ".join(splits) or "none"
        raise UserError(f"{key}={str(folder)!r}: {folder / INDEX_FILE} has no {split!r} split (it has: {have}); "
                        f"point {key} at a shard set with one, or write one with "
                        f"`vitscale shards write SRC OUT --split {split}`")
    shards = splits[chosen]["shards"]
    names = folder / index.get("classes_file", CLASSES_FILE)
    classes = tuple(read_class_table(names)) if names.is_file() else None
    return ShardSet(tuple(str(folder / s["file"]) for s in shards), tuple(int(s["samples"]) for s in shards),
                    bool(index["multi_label"]), int(index["num_classes"]), notes, classes)


def _expand(part: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for url in braceexpand.braceexpand(part):
        if not is_remote(url) and glob.has_magic(url):
            out.extend(sorted(glob.glob(url)))
        else:
            out.append(url)
    return out


def _resolve_part(part: str, split: str, key: str) -> ShardSet:
    p = Path(part)
    if not is_remote(part) and p.is_dir():
        if (p / INDEX_FILE).is_file():
            return _from_index(p, split, key)
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if not tars:
            raise UserError(f"{key}={part!r}: the folder holds no {INDEX_FILE} and no .tar shards; write shards "
                            f"with `vitscale shards write SRC {part}`")
        return _counted(tuple(tars), part)
    if not is_remote(part) and not glob.has_magic(part) and "{" not in part and not p.exists():
        raise UserError(f"{key}={part!r} does not exist: give a shard folder written by `vitscale shards write`, "
                        f"a brace pattern, a glob, or URLs")
    urls = _expand(part)
    if not urls:
        raise UserError(f"{key}={part!r} matches no shards: give a folder written by `vitscale shards write`, "
                        f"a brace pattern such as /data/in21k-{{000000..000127}}.tar, a glob, or URLs")
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UserError(f"{key}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}: check "
                        f"{part!r}")
    if len(local) != len(urls):
        return ShardSet(tuple(urls), None)
    return _counted(tuple(urls), part)


def _counted(tars: tuple[str, ...], part: str) -> ShardSet:
    """A set of local tars without an index, counted from their headers (the note says how long
    that took, and how to make it instant)."""
    t0 = time.perf_counter()
    counts = tuple(count_tar_samples(t) for t in tars)
    note = (f"{part}: no {INDEX_FILE}, so {len(tars)} shards were counted from their tar headers in "
            f"{time.perf_counter() - t0:.1f} s (`vitscale shards index {part}` writes one once)")
    return ShardSet(tars, counts, notes=(note,))


def resolve_shards(spec: str, split: str = "train", *, key: str = "data.train",
                   samples_per_epoch: int | None = None) -> ShardSet:
    """The shard set ``spec`` names (see the module docstring), reading the ``split`` of indexed
    folders. ``key`` is the config key or flag that holds ``spec``, for messages. Remote shards
    without an index need ``samples_per_epoch`` (split evenly over them). Every mistake is a
    :class:`UserError` naming ``key`` and the fix."""
    parts = split_sources(spec or "")
    if not parts:
        raise UserError(f"{key} is empty: give a shard folder, a pattern or URLs")
    sets = [_resolve_part(part, split, key) for part in parts]
    urls = tuple(u for s in sets for u in s.urls)
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise UserError(f"{key}={spec!r} names the shard {dup} more than once")
    labelled = [s for s in sets if s.multi_label is not None]
    if len({s.multi_label for s in labelled}) > 1:
        raise UserError(f"{key}={spec!r} mixes single-label and multi-label shard sets")
    counts: tuple[int, ...] | None
    estimated = False
    if all(s.counts is not None for s in sets):
        counts = tuple(c for s in sets for c in s.counts)
    elif samples_per_epoch:
        counts, estimated = tuple([samples_per_epoch // len(urls)] * len(urls)), True
    else:
        raise UserError(f"{key}={spec!r} names remote shards without an index: set data.samples_per_epoch "
                        f"to the number of samples they hold")
    tables = {s.classes for s in sets if s.classes is not None}
    if len(tables) > 1:
        raise UserError(f"{key}={spec!r} joins shard sets whose class tables differ; write them with one table "
                        f"(`vitscale shards write ... --classes FIRST_SHARD_FOLDER`)")
    return ShardSet(urls, counts, labelled[0].multi_label if labelled else None,
                    max((s.num_classes for s in labelled), default=None),
                    tuple(n for s in sets for n in s.notes), tables.pop() if tables else None, estimated)


def check_same_classes(ref: ShardSet, other: ShardSet, ref_key: str, other_key: str) -> None:
    """Class index i must mean the same class in both sets (when both know their class names):
    ImageNet's ``val/`` sharded on its own gets its own table, which differs as soon as one class
    folder is missing or named differently; the indices then silently mean other classes."""
    if ref.classes is None or other.classes is None or ref.classes == other.classes:
        return
    a, b = ref.classes, other.classes
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    first = (f"index {at} is {a[at]!r} there and {b[at]!r} here" if at < min(len(a), len(b))
             else f"the first {at} agree")
    raise UserError(f"{other_key}: its class table differs from {ref_key}'s ({len(b)} vs {len(a)} classes; {first}), "
                    f"so its labels would score against the wrong classes; write it with the same table: "
                    f"`vitscale shards write SRC OUT --split val --classes <{ref_key} shard folder>`")


_PROBE_SAMPLES = 16
_PROBE_URLS = 4
_PROBE_TIMEOUT_S = 10.0


def probe_shards(shards: ShardSet, key: str, *, multi_label: bool, label_key: str | None,
                 timeout_s: float = _PROBE_TIMEOUT_S) -> str:
    """Open the set before any rank starts: a few URLs of a remote set answer (status and first
    bytes), and the first samples of the first shard hold an image and a label this run can read.
    Returns a note for the log; every problem is a :class:`UserError` naming ``key``, an example
    key with the members found, and the fix. Costs one short read per probed URL."""
    urls = shards.urls
    remote = [u for u in urls if is_remote(u)]
    picks = sorted({0, len(remote) - 1, *range(1, min(_PROBE_URLS - 1, len(remote)))}) if remote else []
    for i in picks:
        _probe_url(remote[i], key, timeout_s)
    first = urls[0]
    seen, example, problem = 0, None, None
    samples = iter_tar_samples(first, timeout_s=timeout_s)
    try:
        for sample in samples:
            seen += 1
            example = example or sample
            try:
                if sample.image() is None:
                    raise LabelError("missing_image", "no image member")
                decode_label(sample.files, 1 << 31, multi_label, label_key)
                return f"{key}: samples of {shard_label(first)} hold an image and a label"
            except LabelError as err:
                problem = problem or (sample, str(err))
            if seen >= _PROBE_SAMPLES:
                break
    except ShardReadError as err:
        if seen == 0:
            raise UserError(f"{key}: its first shard cannot be read ({err}); check the path or URL, and the shard "
                            f"with `vitscale shards verify`") from None
    finally:
        with contextlib.suppress(Exception):  # a pipe: command cut short may complain on close
            samples.close()
    if example is None:
        raise UserError(f"{key}: its first shard {shard_label(first)} holds no sample; check it with "
                        f"`vitscale shards verify`")
    sample, why = problem
    members = ", ".join(f".{ext}" for ext in sorted(sample.files)) or "none"
    txt = sample.files.get("txt")
    said = f" (its .txt reads {txt[:40].decode('utf-8', 'replace')!r})" if txt is not None else ""
    want = ("a .json with an integer list 'labels' (multi-label)" if multi_label else
            "an image (.jpg/.png/.webp) and a label: .cls, a .txt holding an integer, or an integer .json field")
    raise UserError(f"{key}: none of the first {seen} samples of {shard_label(first)} can be trained on: e.g. "
                    f"sample {sample.key} has members {members}{said}: {why}. vitscale needs {want}; set "
                    f"data.label_key=FIELD if the class index is another .json field, or write labelled shards "
                    f"with `vitscale shards write`")


def _probe_url(url: str, key: str, timeout_s: float) -> None:
    """The first bytes of ``url`` arrive within ``timeout_s``; a :class:`UserError` otherwise."""
    outcome: dict = {}

    def read() -> None:
        try:
            with open_stream(url, 0, timeout_s) as stream:
                outcome["head"] = stream.read(512)
        except Exception as err:  # classified below; the thread never raises
            if len(outcome.get("head", b"")) < 512:  # closing a pipe: command early may fail; that is no error
                outcome["error"] = err

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout_s + 5)
    err = outcome.get("error")
    if t.is_alive() or err is not None or len(outcome.get("head", b"")) < 512:
        what = (f"no answer within {timeout_s:g} s" if t.is_alive() else
                f"{type(err).__name__}: {err}" if err is not None else "fewer than 512 bytes")
        raise UserError(f"{key}: shard {url} cannot be read ({what}); check the host, port and file names "
                        f"(a test: `curl -sI {url}` for http)")
