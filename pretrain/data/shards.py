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
    OUT/_parts/                  with ``shards write --part I/N``: one record per finished part
                                 (data_tools.parts), joined into index.json by ``shards merge``
    OUT/dedup.json               after ``shards dedup``: training keys the loader leaves out
                                 (pretrain.data.exclusions)

A sample is consecutive tar members sharing a key. The key and extension follow WebDataset's own
rule (``webdataset.tariterators.base_plus_ext``): the key is the member path up to the first dot
of its file name, the extension everything after it, so ``n01440764_10000.JPEG.jpg`` is key
``n01440764_10000`` with extension ``JPEG.jpg``. A member's *kind* is the last part of its
extension, lower-cased (``jpg`` there), which is how WebDataset's decoders pick a member too.

Kinds read: the image ``jpg`` / ``png`` (``jpeg`` and ``webp`` too); the label ``cls`` (ASCII
decimal class index), ``txt`` holding only an integer (a caption is not a label), or ``json``
(``{"label": i}`` single-label, ``{"labels": [...]}`` multi-label; another field name with
``data.label_key``). Shards we write have ``KEY.jpg`` + ``KEY.cls`` or ``KEY.json``, with fixed
member metadata (mtime 0, uid/gid 0, mode 0644, ustar), so the same samples always give
byte-identical shards.

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
LABEL_EXTS = ("cls", "txt", "json")
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

def split_member_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a tar member by WebDataset's rule: ``a/b.c.d`` -> ``("a/b", "c.d")``.
    The extension is lower-cased; a name without a dot has the empty extension."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def member(files: dict[str, bytes], kind: str) -> bytes | None:
    """The member of ``kind`` (``jpg``, ``cls`` ...): the extension itself, else the one extension
    whose last part is ``kind`` (``JPEG.jpg``); None when there is none or it is ambiguous."""
    if kind in files:
        return files[kind]
    found = [v for ext, v in files.items() if ext.rsplit(".", 1)[-1] == kind]
    return found[0] if len(found) == 1 else None


@dataclass
class TarSample:
    """One sample read back from a shard: its key, ``{extension: bytes}``, the shard's name and
    the byte offset of its first member's header in the shard (where a read can start again)."""

    key: str
    shard: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    duplicate_members: list[str] = field(default_factory=list)
    offset: int = 0

    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            data = member(self.files, ext)
            if data is not None:
                return ext, data
        return None


class ShardReadError(OSError):
    """A shard could not be read to its end; the samples before the damage have been yielded.
    ``reason`` classifies it for the lost-sample counts: ``missing_shard`` (no such file or URL),
    ``unreachable`` (the storage did not answer: refused, reset, timed out, 5xx) or
    ``truncated_shard`` (the bytes ended early or are not a tar)."""

    def __init__(self, message: str, missing: bool = False, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or ("missing_shard" if missing else "truncated_shard")

    @property
    def missing(self) -> bool:
        return self.reason == "missing_shard"


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def open_stream(url: str, offset: int = 0, timeout_s: float = 60.0):
    """A binary stream of shard ``url`` from byte ``offset`` on. ``http(s)://`` is read by
    :mod:`pretrain.data.remote` (ranged requests, a read timeout, classified errors); other
    schemes by WebDataset's ``gopen`` (``pipe:``, ``s3://`` and ``gs://`` through their CLIs),
    skipping ``offset`` bytes."""
    if url.startswith(("http://", "https://")):
        from pretrain.data.remote import open_http

        return open_http(url, offset, timeout_s)
    if is_remote(url):
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
        _skip(stream, offset)
        return stream
    f = open(url, "rb")  # noqa: SIM115 - the caller closes it
    f.seek(offset)
    return f


def _skip(stream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"the stream ended {n} bytes before the offset to resume at")
        n -= len(chunk)


def shard_label(url: str) -> str:
    """The name used for a shard in messages and bad-sample counts (its file name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


_DRAIN_LIMIT = 1 << 20  # bytes read after the end-of-archive blocks (tar pads to 10 KiB records)


def iter_tar_samples(url: str | Path, check_end: bool = False, offset: int = 0,
                     timeout_s: float = 60.0) -> Iterator[TarSample]:
    """Samples of one shard, members grouped by key (as WebDataset does), read as a stream,
    starting at byte ``offset`` (a member header: a sample's ``offset`` from an earlier read).

    Raises :class:`ShardReadError` when the shard is missing, unreachable, truncated or corrupt,
    after yielding every complete sample before the damage. ``check_end`` (local files) also
    requires the end-of-archive blocks, which catches a cut exactly between two members
    (``tarfile`` alone accepts that silently); the last sample is then withheld, since it may
    have lost members. A remote stream is read to its end before it is closed, so a ``pipe:``
    command (``curl``) is never cut off by a closed pipe (its exit status would fail the read).
    """
    url = str(url)
    name = shard_label(url)
    current: TarSample | None = None
    remote = is_remote(url)
    try:
        # a local tar is read in random-access mode, each member's data with one read of the file, and
        # plain headers are decoded by FastTarInfo: together ~55% less CPU per sample than tarfile's
        # stream mode with extractfile()
        with open_stream(url, offset, timeout_s) as stream:
            with tarfile.open(fileobj=stream, mode="r|*" if remote or offset else "r:*", tarinfo=FastTarInfo) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_member_name(info.name)
                    data = _member_data(tar, info, direct=not remote and not offset and tar.fileobj is stream)
                    if len(data) != info.size:
                        raise ShardReadError(f"member {info.name} is truncated")
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = TarSample(key, name, offset=offset + info.offset)
                    if ext in current.files:
                        current.duplicate_members.append(info.name)
                    current.files[ext] = data
                end = offset + tar.offset
            if remote:
                stream.read(_DRAIN_LIMIT)
    except ShardReadError:
        raise
    except FileNotFoundError as err:
        raise ShardReadError(f"{name} does not exist", missing=True) from err
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = getattr(err, "reason", None)
        if not isinstance(reason, str):  # a pipe: command that failed (curl's exit status) may be retried
            reason = "unreachable" if remote and isinstance(err, OSError) and not isinstance(err, EOFError) else None
        raise ShardReadError(f"{name}: {err}", reason=reason) from err
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
            for info in tar:
                if info.isfile():
                    keys.add(split_member_name(info.name)[0])
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


def _int_text(data: bytes) -> int | None:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def decode_label(files: dict[str, bytes], num_classes: int, multi_label: bool,
                 label_key: str | None = None) -> int | list[int]:
    """The class index or the sorted class indices of a sample; :class:`LabelError` otherwise.

    Single-label: ``.cls``, else ``.txt`` holding only an integer, else ``.json``'s ``label``
    field. Multi-label: ``.json``'s ``labels`` list. ``label_key`` names another JSON field
    (``data.label_key``); it may hold an integer or a list of integers."""
    field_name = label_key or ("labels" if multi_label else "label")
    raw = None if multi_label else member(files, "cls")
    if raw is not None:
        value = _int_text(raw)
        if value is None:
            raise LabelError("bad_label", f"bad label (.cls is {raw[:20]!r})")
        values = [value]
    elif not multi_label and (raw := member(files, "txt")) is not None and _int_text(raw) is not None:
        values = [_int_text(raw)]
    elif (raw := member(files, "json")) is not None:
        try:
            value = json.loads(raw).get(field_name)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise LabelError("bad_label", "unreadable .json") from None
        listed = value if isinstance(value, list) else [value]
        if not listed or not all(isinstance(v, int) and not isinstance(v, bool) for v in listed) or (
                not multi_label and len(listed) != 1):
            want = "an integer list" if multi_label else "an integer"
            raise LabelError("missing_label", f"missing label (.json has no {want} {field_name!r})")
        values = sorted(set(listed))
    else:
        found = ", ".join(f".{ext}" for ext in sorted(files)) or "none"
        want = ".json with 'labels'" if multi_label else ".cls, an integer .txt or .json with 'label'"
        raise LabelError("missing_label", f"missing label (want {want}; members: {found})")
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
