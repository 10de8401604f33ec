"""Complete, atomic, verifiable training checkpoints: the one owner of their on-disk layout.

Layout (a user may point at any of the three levels)::

    RUN_DIR/checkpoints/latest                 names the newest complete tag (replaced atomically)
    RUN_DIR/checkpoints/step_00000100/         DeepSpeed model + optimizer shards of every rank
        rank_00000.pt ...                      per-rank component states (loop, data, rng, ...)
        vitscale.json                          format, model spec, step, world size, ZeRO stage,
                                               optimizer, mode, version, resolved config, and
                                               size + sha256 of every file
    RUN_DIR/checkpoints/universal/step_.../    DeepSpeed universal conversion of a tag (another
                                               world size resumes from it)

A save goes to ``.tmp-step_...``; only when every rank has written and hashed its files does
rank 0 write ``vitscale.json``, rename the directory to its tag and replace ``latest``. Writing
can run in the background (``checkpoint.async_save``): the step then waits only for the state to
be copied off the training buffers, and the checkpoint becomes visible a few steps later, when
every rank's writer is done. A crash at
any moment leaves the previous checkpoint and ``latest`` intact; stale temporary directories are
removed by the next save. The ``keep`` newest complete checkpoints (by step number) are kept,
never the one ``latest`` names. Files are fsynced before the rename, so the guarantee also holds
for a node that loses power, on file systems that honour fsync. A ``latest`` that is damaged in
any way (empty, garbage, naming a missing or broken tag) is never fatal: resume falls back to the
newest tag, by step number, that verifies. ``run.dir`` must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.core.errors import UserError
from pretrain.core.files import fsync_dir, fsync_path, sha256_file, write_atomic
from pretrain.core.version import __version__ as VERSION

META = "vitscale.json"
LATEST = "latest"
UNIVERSAL = "universal"
TRAINING_FORMAT = "vitscale-deepspeed"
UNIVERSAL_FORMAT = "vitscale-deepspeed-universal"
_TAG = re.compile(r"^step_(\d{8,})$")
OPTIMIZER_STATE_BYTES = {"adamw": 12, "sgd": 8}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step a tag name stands for, or None when it is not a tag name."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def checkpoint_bytes(params: int, optim: str) -> int:
    """Size of one checkpoint: bf16 weights (2 B) + optimizer states per parameter (fp32 master
    4 + moments: AdamW 8, SGD momentum 4), i.e. 14 B/param for AdamW and 10 B/param for SGD."""
    return params * (2 + OPTIMIZER_STATE_BYTES[optim])


def is_tag_dir(p: Path) -> bool:
    has_states = (p / META).is_file() or any(p.glob("*model_states.pt"))
    return p.is_dir() and has_states and not (p / "zero").is_dir()


def is_universal_dir(p: Path) -> bool:
    return p.is_dir() and (p / "zero").is_dir() and any(p.glob("*model_states.pt"))


def read_meta(tag_dir: Path) -> dict | None:
    """``vitscale.json`` of a tag (or universal) dir; None when it is missing or unreadable."""
    try:
        meta = json.loads((Path(tag_dir) / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def read_latest(ckdir: Path) -> str | None:
    """The tag ``ckdir/latest`` names, or None when the file is missing, unreadable or holds
    anything but a tag name."""
    try:
        text = (Path(ckdir) / LATEST).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if step_of(text) is not None else None


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
    """A run dir, its ``checkpoints`` dir, or a tag dir -> the tag dir (``latest``'s, else the
    newest tag by step number)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for ckdir in (p / "checkpoints", p):
        tag = read_latest(ckdir) or (tags_of(ckdir) or [None])[-1]
        if tag is not None:
            return ckdir / tag
    raise UserError(f"no vitscale checkpoint at {str(p)!r}: expected a run directory, its checkpoints/ "
                    f"directory or a checkpoint tag directory holding {META}")


def tags_of(ckdir: Path) -> list[str]:
    """Complete-looking tag directories of ``ckdir``, oldest first by step number."""
    if not Path(ckdir).is_dir():
        return []
    tags = [p.name for p in Path(ckdir).iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of)


class CheckpointManager:
    """Saves and finds checkpoints of one run; every method is called on all ranks (``comm`` may
    be None in a single process that only reads)."""

    def __init__(self, run_dir: Path, rank: int, world: int, keep: int, comm):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world, self.keep, self.comm = rank, world, keep, comm
        self.pending: _PendingSave | None = None
        self._writer: _Writer | None = None  # the background writer thread, started at the first background save

    # ---- finding ----
    def tags(self) -> list[str]:
        return tags_of(self.dir)

    def latest(self) -> Path | None:
        tag = read_latest(self.dir)
        return None if tag is None else self.dir / tag

    def has_checkpoints(self) -> bool:
        return (self.dir / LATEST).exists() or bool(self.tags())

    def candidates(self) -> list[Path]:
        """Where a resume looks, best first: ``latest``, then older tags by step number. Tags
        newer than ``latest`` are never used (they belong to an abandoned branch after
        ``--resume`` of an older one); without a usable ``latest`` (missing, damaged, or naming a
        tag that is not there) every tag is a candidate."""
        first = self.latest()
        tags = [self.dir / t for t in reversed(self.tags())]
        if first is None or not first.is_dir():
            return tags
        return [first] + [t for t in tags if step_of(t.name) < step_of(first.name)]

    def usable_for_resume(self) -> tuple[Path | None, list[str]]:
        """Newest candidate that verifies, plus warnings about the ones skipped (a damaged
        ``latest`` file is one). All ranks share the sha256 work and agree on the result."""
        warnings = []
        if (self.dir / LATEST).exists() and self.latest() is None:
            warnings.append(f"{self.dir / LATEST} does not name a checkpoint tag (empty or damaged)")
        elif self.latest() is not None and not self.latest().is_dir():
            warnings.append(f"{self.dir / LATEST} names {self.latest().name}, which does not exist")
        for tag_dir in self.candidates():
            if not tag_dir.is_dir():
                continue
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
        if self.comm is None:
            return problems
        gathered = self.comm.all_gather_object(problems)
        return sorted({p for part in gathered for p in part})

    # ---- saving ----
    def save(self, engine, step: int, meta: dict, rank_state: dict,
             before_publish: Callable[[], None] | None = None, background: bool = False) -> Path | None:
        """Checkpoint ``step``: model, optimizer, ``rank_state`` of every rank, ``meta``.

        Without ``background`` the files are written, fsynced and hashed, and the checkpoint is
        published (see :meth:`publish`) before this returns its path. With ``background`` this
        returns None once the state is copied off the training buffers into CPU memory (the
        engine's files and ``rank_state``); a thread writes, fsyncs and hashes this rank's
        files while training goes on, and :meth:`publish` makes the checkpoint visible once every
        rank's thread is done. At most one save is in flight: a new one first publishes the last.
        ``before_publish`` runs on every rank once its files are written and hashed (tests use it
        to kill a process mid-save)."""
        if self.pending is not None:
            self.publish()
        tag = tag_for(step)
        tmp = self.dir / f".tmp-{tag}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.comm.barrier()
        try:
            files = engine.save(self.dir, tmp.name, client_state={"step": step}, defer=background)
        except (OSError, RuntimeError) as err:
            raise save_failure(err, self.dir, step) from err
        files.append((cpu_copy(rank_state), tmp / f"rank_{self.rank:05d}.pt"))
        self.pending = _PendingSave(step, tag, tmp, meta, files, before_publish, self.dir)
        if not background:
            self.pending.run()
            self.pending.done.set()
            return self.publish()
        if self._writer is None:
            self._writer = _Writer()
        self._writer.submit(self.pending)
        return None

    def writing(self) -> bool:
        """Whether this rank's background writer is still at work."""
        return self.pending is not None and not self.pending.done.is_set()

    def publish(self) -> Path:
        """Wait for this rank's writer, gather every rank's file hashes and let rank 0 make the
        checkpoint visible: ``vitscale.json``, the rename to its tag, ``latest``, pruning. A
        collective: every rank calls it at the same point. A writer that failed (disk full,
        read-only) is a :class:`UserError` on every rank, naming the cause."""
        pending, self.pending = self.pending, None
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        parts = self.comm.all_gather_object(pending.outcome)
        errors = [p for p in parts if isinstance(p, str)]
        if errors:
            raise UserError(errors[0])
        files = {name: info for part in parts for name, info in part.items()}
        final = self.dir / pending.tag
        if self.rank == 0:
            written = sorted(f.name for f in pending.tmp.iterdir() if f.is_file())
            if sorted(files) != written:
                raise RuntimeError(f"{pending.tmp}: files {written} but the ranks wrote {sorted(files)}")
            write_atomic(pending.tmp / META, json.dumps({**pending.meta, "step": pending.step, "version": VERSION,
                                                         "files": files}, indent=1))
            old = self.dir / f".tmp-old-{pending.tag}"
            if final.exists():  # same step saved again (resumed from an older tag): move it aside first
                os.replace(final, old)
            os.replace(pending.tmp, final)
            fsync_dir(self.dir)
            write_atomic(self.dir / LATEST, pending.tag)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(pending.tag)
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

    # ---- loading ----
    def load_rank_state(self, tag_dir: Path, rank: int | None = None) -> dict | None:
        """The component states saved by ``rank`` (default: this rank)."""
        path = Path(tag_dir) / f"rank_{self.rank if rank is None else rank:05d}.pt"
        if not path.is_file():
            return None
        return torch.load(path, weights_only=False, mmap=True)  # read on touch: other ranks' EMA pieces


def cpu_copy(obj):
    """``obj`` with every tensor in it copied to the CPU (a snapshot training cannot change)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class _PendingSave:
    """One rank's part of a save: write (where not written yet), fsync and hash its files.
    ``outcome`` is ``{file name: {"bytes", "sha256"}}``, or the message of a save failure;
    ``done`` is set when :meth:`run` has finished (``error``: what it raised, if anything)."""

    def __init__(self, step: int, tag: str, tmp: Path, meta: dict, files: list, before_publish, ckdir: Path):
        self.step, self.tag, self.tmp, self.meta, self.files = step, tag, tmp, meta, files
        self.before_publish, self.ckdir = before_publish, ckdir
        self.outcome: dict | str = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for state, path in self.files:
                if state is not None:
                    torch.save(state, path)
                fsync_path(path)
                self.outcome[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            self.files = []
        except (OSError, RuntimeError) as err:
            failure = save_failure(err, self.ckdir, self.step)
            if not isinstance(failure, UserError):
                raise
            self.outcome = str(failure)
        if self.before_publish is not None:
            self.before_publish()


class _Writer(threading.Thread):
    """The rank's one background writer: a thread that lives from the first background save to
    the end of the process and runs the saves handed to it in turn.

    One long-lived thread rather than one per save, because a thread that starts or ends while
    the training process forks DataLoader workers (every evaluation does) can deadlock the new
    worker: up to CPython 3.11 the child re-initialises thread states under the runtime lock
    that a starting or exiting thread may hold at that instant (CPython gh-112275), and
    ``Thread.join()`` returns before an exiting thread has let go of it. Seen as a final
    evaluation that never started, right after the last save was published. The constructor
    returns once the thread runs, so no fork can meet its start either."""

    def __init__(self) -> None:
        super().__init__(name="vitscale-checkpoint-writer", daemon=True)
        self._jobs: queue.SimpleQueue[_PendingSave] = queue.SimpleQueue()
        self._running = threading.Event()
        self.start()
        self._running.wait()

    def submit(self, job: _PendingSave) -> None:
        self._jobs.put(job)

    def run(self) -> None:
        self._running.set()
        while True:
            job = self._jobs.get()
            try:
                job.run()
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by publish()
                job.error = err
            finally:
                job.done.set()


_LOW_SPACE = 64 << 20


def save_failure(err: Exception, ckdir: Path, step: int) -> Exception:
    """A :class:`UserError` naming the cause when a save failed for a reason the user can fix
    (disk full, read-only or not writable); ``err`` itself otherwise (a bug keeps its traceback).
    Libraries word these differently (``OSError`` with an errno, or a ``RuntimeError`` from
    torch's writer such as ``basic_ios::clear``), so the file system is asked as well."""
    errno_ = getattr(err, "errno", None)
    text = str(err)
    keep = "The previous checkpoint is intact; relaunching the same command resumes from it"
    try:
        free = shutil.disk_usage(ckdir).free
    except OSError:
        free = None
    if errno_ == 28 or "No space left" in text or (free is not None and free < _LOW_SPACE):
        have = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return UserError(f"the checkpoint of step {step} could not be written: the disk under {ckdir} is full{have}. "
                         f"Free space or lower checkpoint.keep. {keep}")
    if errno_ in (13, 1, 30) or "Permission denied" in text or "Read-only" in text or not os.access(ckdir, os.W_OK):
        return UserError(f"the checkpoint of step {step} could not be written: {ckdir} is read-only or not writable "
                         f"for this user ({text.splitlines()[0] if text else type(err).__name__}). Fix its "
                         f"permissions or set run.dir to a writable directory. {keep}")
    return err
