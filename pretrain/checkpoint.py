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
``latest`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pretrain.errors import UserError

META = "vitscale.json"
VERSION = "0.1.0"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def usable_for_resume(self) -> tuple[Path | None, list[str]]:
        """Newest checkpoint that verifies, starting at ``latest``; plus warnings about the
        ones skipped. All ranks share the sha256 work and agree on the result."""
        first = self.latest()
        if first is None:
            return None, []
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
    def save(self, engine, step: int, meta: dict, rank_state: dict) -> Path:
        """Write checkpoint ``step`` (model, optimizer, ``rank_state`` of every rank, ``meta``)."""
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
        mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                for n in names[self.rank::self.world]}
        files = {}
        for part in self.comm.all_gather_object(mine):
            files.update(part)
        final = self.dir / tag
        if self.rank == 0:
            (tmp / META).write_text(json.dumps({**meta, "step": step, "version": VERSION,
                                                 "files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", tag)
            self._prune(tag)
        self.comm.barrier()
        return final

    def _prune(self, latest_tag: str) -> None:
        tags = self.tags()
        for old in tags[:-self.keep]:
            if old != latest_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)

    def load_rank_state(self, tag_dir: Path) -> dict | None:
        path = Path(tag_dir) / f"rank_{self.rank:05d}.pt"
        if not path.is_file():
            return None
        return torch.load(path, weights_only=False)
