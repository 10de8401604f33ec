"""Small file-system pieces every floor uses: atomic writes, fsync, sha256.

An atomic write goes to a hidden temporary name beside the target, is fsynced, and is renamed
over the target (``os.replace``), so a reader sees the old content or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where the file system cannot."""
    with contextlib.suppress(OSError):
        fsync_path(path)


def write_atomic(path: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically; ``durable`` also fsyncs the file and its folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
