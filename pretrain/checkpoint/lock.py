"""One job per run directory: a lock file held for the job's whole life.

``RUN_DIR/.vitscale.lock`` holds ``{"host", "pid", "pid_started", "started", "command", "slurm_job",
"token"}``. It is created atomically (``O_CREAT | O_EXCL``, which NFS v3+ and Lustre honour) by the
process that owns the job on node 0: the ``vitscale pretrain|finetune`` launcher (node rank 0),
or rank 0 itself when another launcher (torchrun, srun, deepspeed) started the ranks. A second
job on the same ``run.dir`` stops before anything starts, with one line naming the holder.

The holder refreshes the file's mtime every ``HEARTBEAT_S`` seconds and removes the file when it
exits (also after an error or a preemption). A lock whose holder died without removing it
(``kill -9``, a lost node) is taken over:

- on the same host, when the holder's pid is gone or now belongs to another process;
- from another host, when its heartbeat is older than ``STALE_S`` seconds;
- by a requeued SLURM job whose id is the holder's (SLURM ends one incarnation before the next).

``--force-unlock`` removes a lock unconditionally: for when you know its holder is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil

from pretrain.core.errors import UserError

LOCK_FILE = ".vitscale.lock"
HEARTBEAT_S = 15.0
STALE_S = 60.0
_PARTIAL_S = 10.0  # an unreadable lock younger than this may still be being written


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class RunLock:
    """``with RunLock(run_dir, "pretrain"): ...`` holds the lock of ``run_dir`` (created if
    needed) for the block; :class:`UserError` when another live job holds it."""

    def __init__(self, run_dir: str | Path, command: str, force: bool = False):
        self.path = Path(run_dir) / LOCK_FILE
        self.command, self.force = command, force
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---- holder ----
    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": self.command,
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "token": self.token}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.force:
            self.path.unlink(missing_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self._beat = threading.Thread(target=self._heartbeat, name="vitscale-lock", daemon=True)
            self._beat.start()
            return
        raise UserError(f"could not take the lock {self.path}: other jobs keep taking it; use another run.dir")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._ours():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def _ours(self) -> bool:
        holder = self.holder()
        return holder is not None and holder.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._ours():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- another holder ----
    def holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def stale_reason(self, holder: dict | None) -> str | None:
        """Why ``holder``'s lock no longer counts, or None while its job may be alive."""
        if holder is None:
            return "it is unreadable" if self._age() > _PARTIAL_S else None
        if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
            return f"it belongs to an earlier run of this SLURM job ({holder['slurm_job']})"
        if holder.get("host") == socket.gethostname():
            started = _process_start(int(holder.get("pid", -1)))
            if started is None or (holder.get("pid_started") and abs(started - holder["pid_started"]) > 1.0):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        if self._age() > STALE_S:
            return f"its heartbeat stopped {self._age():.0f} s ago"
        return None

    def _take_over_if_stale(self) -> None:
        holder = self.holder()
        reason = self.stale_reason(holder)
        if reason is None:
            who = (f"`vitscale {holder.get('command')}` (pid {holder.get('pid')} on {holder.get('host')}, started "
                   f"{holder.get('started')})") if holder else "a job that is starting"
            raise UserError(f"run.dir {self.path.parent} is in use by {who}; its lock is {self.path}. Wait for that "
                            f"job to end or choose another run.dir; if it is gone, pass --force-unlock (a lock "
                            f"held from another host also goes stale {STALE_S:.0f} s after its last heartbeat)")
        with contextlib.suppress(FileNotFoundError):
            if self.holder() == holder:
                os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{self.token}"))
                self.path.with_name(f"{LOCK_FILE}.stale-{self.token}").unlink()
