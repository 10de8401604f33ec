"""The shard format, in one place: what a shard set is, where its shards are, how they are read.

The writer, ``shards verify`` and ``shards stats``, the training and eval loaders, the loader
benchmark and preflight all go through this module; none of them parses an index, a tar member
name or a label by itself.

A folder written by ``vitscale shards write SRC OUT``::

    OUT/<split>-000000.tar ...   WebDataset shards; split "train" (and "val" with --val-fraction,
                                 or any name given with --split)
    OUT/classes.json             {"classes": [names], "class_to_idx": {name: idx}}
    OUT/index.json               {"version": 1, "multi_label", "num_classes", "classes_file",
                                  "splits": {NAME: {"samples", "bytes",
                                                    "shards": [{"file", "samples", "bytes", "sha256"}]}},
                                  "skipped", "options"}
    OUT/skipped.jsonl            one {"path", "reason"} per source image that was left out
    OUT/.progress/               per-shard sidecars that let an interrupted write resume

A sample is consecutive tar members sharing a key (the member name up to its first dot, as in
WebDataset): ``KEY.jpg`` / ``KEY.png`` (the image; ``jpeg`` and ``webp`` are read too), then
``KEY.cls`` (ASCII decimal class index, single-label) and/or ``KEY.json`` (``{"labels": [...]}``
for multi-label, plus any extra manifest fields). Members are written with fixed metadata
(mtime 0, uid/gid 0, mode 0644, ustar), so the same samples always give byte-identical shards.

What a user names as a shard set (``data.train`` and friends) is resolved by
:mod:`pretrain.data.shard_sets`, on top of this module.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.data.tar_header import FastTarInfo

INDEX_VERSION = 1
INDEX_FILE = "index.json"
CLASSES_FILE = "classes.json"
SKIPPED_FILE = "skipped.jsonl"
PROGRESS_DIR = ".progress"
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
SHARD_FILE = re.compile(r"^(?P<split>[a-z][a-z0-9_]*)-\d{6}\.tar$")


# ---- writing (used by data_tools.shard_writer) ----

def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata, so identical content gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(tar_member(name, len(data)), io.BytesIO(data))


def tar_member_bytes(size: int) -> int:
    """Bytes one member of ``size`` takes in a tar: a 512-byte header plus padded data."""
    return 512 + -(-size // 512) * 512


def json_bytes(obj: object) -> bytes:
    """Canonical JSON (sorted keys, no spaces) so label files are deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---- reading samples ----

@dataclass
class TarSample:
    """One sample read back from a shard: its key, ``{extension: bytes}`` and the shard's name."""

    key: str
    shard: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    duplicate_members: list[str] = field(default_factory=list)

    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            if ext in self.files:
                return ext, self.files[ext]
        return None


class ShardReadError(OSError):
    """A shard could not be read to its end (``missing``, or truncated or corrupt); the samples
    before the damage have been yielded."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def open_stream(url: str):
    if is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def shard_label(url: str) -> str:
    """The name used for a shard in messages and bad-sample counts (its file name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def iter_tar_samples(url: str | Path, check_end: bool = False) -> Iterator[TarSample]:
    """Samples of one shard, members grouped by key (as WebDataset does), read as a stream.

    Raises :class:`ShardReadError` when the shard is missing, truncated or corrupt, after yielding
    every complete sample before the damage. ``check_end`` (local files) also requires the
    end-of-archive blocks, which catches a cut exactly between two members (``tarfile`` alone
    accepts that silently); the last sample is then withheld, since it may have lost members.
    """
    url = str(url)
    name = shard_label(url)
    current: TarSample | None = None
    remote = is_remote(url)
    try:
        # a local tar is read in random-access mode, each member's data with one read of the file, and
        # plain headers are decoded by FastTarInfo: together ~55% less CPU per sample than tarfile's
        # stream mode with extractfile()
        with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*" if remote else "r:*",
                                                      tarinfo=FastTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                data = _member_data(tar, member, direct=not remote and tar.fileobj is stream)
                if len(data) != member.size:
                    raise ShardReadError(f"member {member.name} is truncated")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(key, name)
                ext = ext.lower()
                if ext in current.files:
                    current.duplicate_members.append(member.name)
                current.files[ext] = data
            end = tar.offset
    except ShardReadError:
        raise
    except FileNotFoundError as err:
        raise ShardReadError(f"{name} does not exist", missing=True) from err
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardReadError(f"{name}: {err}") from err
    if check_end and not is_remote(url):  # before the last sample: without the end blocks it may be cut short
        with open(url, "rb") as f:
            f.seek(end)
            if f.read(1024) != bytes(1024):
                raise ShardReadError(f"no end-of-archive marker after byte {end}: the tar is truncated")
    if current is not None:
        yield current


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo, direct: bool) -> bytes:
    if direct and not member.issparse():
        tar.fileobj.seek(member.offset_data)
        return tar.fileobj.read(member.size)
    fileobj = tar.extractfile(member)
    return fileobj.read() if fileobj is not None else b""


def count_tar_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar, from its headers only (member data is skipped)."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.rsplit("/", 1)[-1].split(".", 1)[0])
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"shard {path} cannot be read ({err}); check it with `vitscale shards verify` or "
                        f"rewrite it") from None
    return len(keys)


class SampleError(ValueError):
    """A sample cannot be trained on; ``reason`` (missing_image, missing_label, bad_label,
    label_out_of_range) is the key of bad-sample counts, ``str()`` says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class LabelError(SampleError):
    """The sample's label is missing, unreadable or out of range."""


def image_bytes(sample: TarSample) -> bytes:
    """The encoded image of ``sample``; :class:`SampleError` when it has none."""
    image = sample.image()
    if image is None:
        raise SampleError("missing_image", f"no image (members: {', '.join(sorted(sample.files)) or 'none'})")
    return image[1]


def decode_label(files: dict[str, bytes], num_classes: int, multi_label: bool) -> int | list[int]:
    """The class index (single-label: ``.cls``, else ``.json``'s ``label``) or the sorted class
    indices (multi-label: ``.json``'s ``labels`` list) of a sample; :class:`LabelError` otherwise."""
    if multi_label:
        if "json" not in files:
            raise LabelError("missing_label", "missing label (no .json)")
        try:
            labels = json.loads(files["json"]).get("labels")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise LabelError("bad_label", "unreadable .json") from None
        if not labels or not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
            raise LabelError("missing_label", "missing label (.json has no integer 'labels' list)")
        values = sorted(set(labels))
    elif "cls" in files:
        try:
            values = [int(files["cls"].decode("ascii").strip())]
        except (UnicodeDecodeError, ValueError):
            raise LabelError("bad_label", f"bad label (.cls is {files['cls'][:20]!r})") from None
    elif "json" in files:
        try:
            values = [int(json.loads(files["json"])["label"])]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise LabelError("missing_label", "missing label (no .cls, and .json has no integer 'label')") from None
    else:
        raise LabelError("missing_label", "missing label (no .cls)")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise LabelError("label_out_of_range", f"label {bad[0]} out of range [0, {num_classes})")
    return values if multi_label else values[0]


# ---- index ----

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; is {path.parent} a folder written by "
                        "`vitscale shards write`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); rewrite the shards with "
                        "`vitscale shards write`.") from None


def load_index(out: Path) -> dict:
    """Read ``OUT/index.json`` and check the fields every reader relies on."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"shard folder {out} does not exist or is not a folder; pass the OUT folder "
                        "given to `vitscale shards write`.")
    index = read_json(out / INDEX_FILE)
    missing = [k for k in ("version", "multi_label", "num_classes", "splits") if k not in index]
    if missing:
        raise UserError(f"{out / INDEX_FILE} lacks {', '.join(missing)}; rewrite it with "
                        "`vitscale shards write`.")
    if index["version"] != INDEX_VERSION:
        raise UserError(f"{out / INDEX_FILE} has version {index['version']}, this vitscale reads "
                        f"version {INDEX_VERSION}; rewrite the shards with this version.")
    return index


def load_classes(out: Path) -> list[str]:
    return list(read_json(Path(out) / CLASSES_FILE)["classes"])


def read_class_table(path: Path) -> list[str]:
    """The class names, in index order, of a shard folder (its ``classes.json``) or of a
    ``classes.json`` file itself: what ``shards write --classes`` takes."""
    path = Path(path)
    table = read_json(path / CLASSES_FILE if path.is_dir() else path)
    names = table.get("classes") if isinstance(table, dict) else None
    if not isinstance(names, list) or not names:
        raise UserError(f"{path}: no class list there; give a shard folder written by `vitscale shards write` "
                        f"or its {CLASSES_FILE}")
    return [str(n) for n in names]


def index_entries(index: dict) -> Iterator[tuple[str, dict]]:
    """``(split, shard entry)`` for every shard the index names, in split then shard order."""
    for split, info in index["splits"].items():
        for entry in info.get("shards", []):
            yield split, entry
