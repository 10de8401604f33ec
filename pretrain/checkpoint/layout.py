"""Complete, atomic, verifiable training checkpoints on top of DeepSpeed's sharded save.

Layout (a user may point at any of the three levels)::

    RUN_DIR/checkpoints/latest                 names the newest complete tag (replaced atomically)
    RUN_DIR/checkpoints/step_00000100/         DeepSpeed model + optimizer shards of every rank
        rank_00000.pt ...                      per-rank RNG states and loader state
        vitscale.json                          model spec, step, world size, ZeRO stage, version,
                                               resolved config, and size + sha256 of every file

A save goes to ``.tmp-step_...``; only when every rank has written and hashed its files does
rank 0 write ``vitscale.json``, rename the directory to its tag and replace ``latest``. A crash at
any moment leaves the previous checkpoint and ``latest`` intact; stale temporary directories are
removed by the next save. The ``keep`` newest complete checkpoints are kept, never the one
``latest`` names. Files are fsynced before the rename, so the guarantee also holds for a node
that loses power, on file systems that honour fsync.

A run resumed with another process count converts its checkpoint once into
``checkpoints/universal/<tag>`` (DeepSpeed's universal format; not a ``step_*`` name, so pruning
by step leaves it alone until its source tag is pruned) and loads that. ``run.dir`` must be on a
file system every node sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pretrain import __version__ as VERSION
from pretrain.core.errors import UserError
from pretrain.data.shards import sha256_file

META = "vitscale.json"
UNIVERSAL = "universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        _fsync_path(path)


def read_meta(tag_dir: Path) -> dict | None:
    try:
        return json.loads((Path(tag_dir) / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verify_checkpoint(tag_dir: Path, files: list[str] | None = None) -> list[str]:
    """Problems found in a checkpoint (empty when it is complete and intact). ``files`` limits
    the sha256 check to those names (ranks split the work); sizes are always checked."""
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if meta is None:
        return [f"{tag_dir / META} is missing or unreadable (incomplete save)"]
    problems = []
    for name, info in meta.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, expected {info['bytes']} (truncated)")
        elif (files is None or name in files) and sha256_file(path) != info["sha256"]:
            problems.append(f"{path} fails its sha256 check (corrupted)")
    return problems


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its ``checkpoints`` dir, or a tag dir -> the tag dir that ``latest`` names."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for ckdir in (p / "checkpoints", p):
        latest = ckdir / "latest"
        if latest.is_file():
            return ckdir / latest.read_text().strip()
    raise UserError(f"no vitscale checkpoint at {str(p)!r}: expected a run directory, its checkpoints/ "
                    f"directory (with a 'latest' file) or a checkpoint tag directory holding {META}")


class CheckpointManager:
    """Saves and finds checkpoints of one run; every method is called on all ranks."""

    def __init__(self, run_dir: Path, rank: int, world: int, keep: int, comm):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world, self.keep, self.comm = rank, world, keep, comm

    # ---- finding ----
    def tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.name.startswith("step_") and p.is_dir())

    def latest(self) -> Path | None:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        return self.dir / latest.read_text().strip()

    def has_checkpoints(self) -> bool:
        return self.latest() is not None or bool(self.tags())

    def usable_for_resume(self) -> tuple[Path | None, list[str]]:
        """Newest checkpoint that verifies, starting at ``latest`` and going back to older tags;
        plus warnings about the ones skipped. Tags newer than ``latest`` are never used (they
        belong to an abandoned branch after ``--resume`` of an older one). Without a ``latest``
        file (a crash between the very first rename and writing it) every tag is a candidate.
        All ranks share the sha256 work and agree on the result."""
        first = self.latest()
        if first is None:
            candidates = [self.dir / t for t in reversed(self.tags())]
        else:
            candidates = [first] + [self.dir / t for t in reversed(self.tags()) if self.dir / t != first
                                    and t < first.name]
        warnings = []
        for tag_dir in candidates:
            problems = self.verify_shared(tag_dir)
            if not problems:
                return tag_dir, warnings
            warnings.append(f"checkpoint {tag_dir.name} is not usable: {'; '.join(problems)}")
        return None, warnings

    def verify_shared(self, tag_dir: Path) -> list[str]:
        meta = read_meta(tag_dir)
        names = sorted(meta.get("files", {})) if meta else []
        mine = names[self.rank::self.world]
        problems = verify_checkpoint(tag_dir, mine) if meta else verify_checkpoint(tag_dir)
        gathered = self.comm.all_gather_object(problems)
        return sorted({p for part in gathered for p in part})

    # ---- saving ----
    def save(self, engine, step: int, meta: dict, rank_state: dict,
             before_publish: Callable[[], None] | None = None) -> Path:
        """Write checkpoint ``step`` (model, optimizer, ``rank_state`` of every rank, ``meta``).

        ``before_publish`` runs on every rank once all files are written and hashed, just before
        rank 0 makes the checkpoint visible (tests use it to kill a process mid-save)."""
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        tmp = self.dir / tmp_tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.comm.barrier()
        engine.save(self.dir, tmp_tag, client_state={"step": step})
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{self.rank:05d}.pt")
        self.comm.barrier()
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        mine = {}
        for n in names[self.rank::self.world]:
            _fsync_path(tmp / n)
            mine[n] = {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
        files = {}
        for part in self.comm.all_gather_object(mine):
            files.update(part)
        if before_publish is not None:
            before_publish()
        final = self.dir / tag
        if self.rank == 0:
            _write_atomic(tmp / META, json.dumps({**meta, "step": step, "version": VERSION, "files": files},
                                                 indent=1))
            old = self.dir / f".tmp-old-{tag}"
            if final.exists():  # same step saved again (resumed from an older tag): move it aside first
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            _write_atomic(self.dir / "latest", tag)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(tag)
        self.comm.barrier()
        return final

    def _prune(self, latest_tag: str) -> None:
        tags = self.tags()
        for old in tags[:-self.keep]:
            if old != latest_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        udir = self.dir / UNIVERSAL
        if udir.is_dir():
            kept = set(self.tags())
            for conv in udir.iterdir():
                if conv.is_dir() and conv.name not in kept:
                    shutil.rmtree(conv, ignore_errors=True)

    # ---- another world size ----
    def universal_for(self, tag_dir: Path) -> Path:
        """The universal checkpoint of ``tag_dir``, converted by rank 0 into
        ``checkpoints/universal/<tag>`` if not there yet while the other ranks wait (the wait is
        bounded by ``run.timeout_s``). Every rank gets the path or the same :class:`UserError`."""
        tag_dir = Path(tag_dir)
        out = self.dir / UNIVERSAL / tag_dir.name
        error = None
        if self.rank == 0 and (read_meta(out) or {}).get("universal_source") != str(tag_dir.resolve()):
            try:
                _convert_to_universal(tag_dir, out)
            except UserError as err:
                error = str(err)
        error = self.comm.broadcast_object(error)
        if error is not None:
            raise UserError(error)
        return out

    # ---- loading ----
    def load_rank_state(self, tag_dir: Path, rank: int | None = None) -> dict | None:
        """Loader, loop and RNG state saved by ``rank`` (default: this rank)."""
        path = Path(tag_dir) / f"rank_{self.rank if rank is None else rank:05d}.pt"
        if not path.is_file():
            return None
        return torch.load(path, weights_only=False)


def _convert_to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's converter into ``.tmp-<tag>`` beside ``out``, then one rename. Preemption
    signals are held back meanwhile (the converter's processes would die of them) and handled
    once it is done."""
    from pretrain.formats.deepspeed_ckpt import to_universal

    tmp = out.with_name(f".tmp-{out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    held = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        meta = to_universal(tag_dir, tmp)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    _write_atomic(tmp / META, json.dumps({**meta, "universal_source": str(tag_dir.resolve())}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    _write_atomic(out.parent / "latest_universal", out.name)
