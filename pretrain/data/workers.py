"""How DataLoader workers are started, for every loader of the package.

A rank process runs threads besides Python's: gloo's (or NCCL's) communication threads, DeepSpeed's,
a background checkpoint writer. ``fork()`` while one of them holds the interpreter's runtime lock
leaves the child waiting forever in ``PyOS_AfterFork_Child`` (CPython 3.11, gh-112275: seen here as a
few-shot or eval DataLoader worker that never started, the job hung). So once a process group is
initialized, workers are started through a *forkserver*: a single-threaded server process, started
once per rank with the loaders' modules imported, forks them. Without a process group (the
benchmarks, `vitscale evaluate`, tests that build a loader in-process) workers fork directly, which
starts faster and inherits the caller's state.

Either way a worker dies with the process that made its DataLoader (:func:`die_with`): a forked
worker through the kernel's parent-death signal; a forkserver's worker, whose parent is the server,
by watching that process (the server itself only exits once its workers are gone: each holds the
pipe the server watches), so a ``kill -9`` of the job, or a rank that exits without shutting its
loaders down, leaves no worker or server behind (nor a pipe of the job's output held open).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

_PRELOAD = ["pretrain.data.loader", "pretrain.data.fewshot"]  # what forked workers run, imported once
_WATCH_S = 0.5  # how often a forkserver's worker looks whether its DataLoader's process still runs


def die_with_parent(_worker_id: int = 0) -> None:
    """``worker_init_fn``: the kernel kills a DataLoader worker when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def die_with(owner: int, _worker_id: int = 0) -> None:
    """``worker_init_fn`` (bound to the pid of the process that made the DataLoader): the worker
    ends when that process does, whether it is the worker's parent or not."""
    die_with_parent()
    if os.getppid() == owner:
        return

    def watch() -> None:
        while True:
            time.sleep(_WATCH_S)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="vitscale-owner-watch", daemon=True).start()


def worker_options(workers: int) -> dict:
    """``DataLoader`` keywords for ``workers`` worker processes (none for 0): how they start (see
    the module docstring) and that they die with their parent."""
    if not workers:
        return {"num_workers": 0}
    context = None
    if dist.is_available() and dist.is_initialized() and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first use)
    return {"num_workers": workers, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(die_with, os.getpid())}
