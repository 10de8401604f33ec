"""The on-disk shard format shared by the writer, the verifier and the statistics.

Layout of an output folder::

    OUT/train-000000.tar ...   WebDataset shards (val-000000.tar ... with a validation split)
    OUT/classes.json           {"classes": [names], "class_to_idx": {name: idx}}
    OUT/index.json             {"version": 1, "multi_label", "num_classes", "splits": {...}}
    OUT/skipped.jsonl          one {"path", "reason"} per source image that was left out
    OUT/.progress/             per-shard sidecars that let an interrupted write resume

A sample is consecutive tar members ``KEY.jpg`` or ``KEY.png`` (the image), then ``KEY.cls``
(ASCII decimal class index, single-label) and/or ``KEY.json`` (``{"labels": [...]}`` for
multi-label, plus any extra manifest fields). Keys contain only ``[A-Za-z0-9_-]`` because
WebDataset splits a member name at its first dot.

Tar members are written with fixed metadata (mtime 0, uid/gid 0, empty owner names, mode 0644,
ustar format), so the same samples always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.core.errors import UserError

INDEX_VERSION = 1
INDEX_FILE = "index.json"
CLASSES_FILE = "classes.json"
SKIPPED_FILE = "skipped.jsonl"
PROGRESS_DIR = ".progress"
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
SPLITS = ("train", "val")


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(obj: object) -> bytes:
    """Canonical JSON (sorted keys, no spaces) so label files are deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass
class TarSample:
    """One sample read back from a shard: its key and ``{extension: bytes}``."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    duplicate_members: list[str] = field(default_factory=list)

    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            if ext in self.files:
                return ext, self.files[ext]
        return None


def iter_tar_samples(path: Path) -> Iterator[TarSample]:
    """Group consecutive tar members by key (the name up to its first dot), as WebDataset does.

    Raises ``tarfile.TarError`` / ``EOFError`` / ``OSError`` when the archive is truncated or
    corrupt, including a cut exactly between members (no end-of-archive blocks), which
    ``tarfile`` alone accepts silently; samples before the damage have been yielded by then.
    """
    current: TarSample | None = None
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            fileobj = tar.extractfile(member)
            data = fileobj.read() if fileobj is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = TarSample(key)
            if ext.lower() in current.files:
                current.duplicate_members.append(member.name)
            current.files[ext.lower()] = data
        end = tar.offset
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(1024) != bytes(1024):
            raise tarfile.ReadError(f"no end-of-archive marker after byte {end}: the tar is truncated")
    if current is not None:
        yield current


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; is {path.parent} a folder written by "
                        "`vitscale shards write`?") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rewrite the shards with "
                        "`vitscale shards write`.") from None


def load_index(out: Path) -> dict:
    """Read ``OUT/index.json`` and check the fields every reader relies on."""
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
    return list(read_json(out / CLASSES_FILE)["classes"])
