"""Run per-shard jobs over a process pool with a tqdm bar on stderr."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

from pretrain.core.system import available_cpus

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Worker processes by default: every CPU this process may use."""
    return available_cpus()


def map_with_progress(fn: Callable[[T], R], tasks: Sequence[T], workers: int, weights: Sequence[int],
                      desc: str, unit: str = "img", initial: int = 0, total: int | None = None,
                      show: bool = True) -> Iterator[R]:
    """Yield ``fn(task)`` for every task (completion order), advancing the bar by the task's weight.

    ``workers <= 1`` runs in this process (no pickling, easy to debug); otherwise a
    ``multiprocessing`` pool runs one task at a time per worker. ``fn`` must be a module-level
    function. Exceptions raised in a worker propagate with their traceback.
    """
    bar = tqdm(total=total if total is not None else initial + sum(weights), initial=initial, desc=desc,
               unit=unit, file=sys.stderr, disable=not show, dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task, weight in zip(tasks, weights, strict=True):
                result = fn(task)
                bar.update(weight)
                yield result
            return
        with mp.get_context().Pool(min(workers, len(tasks))) as pool:
            for i, result in pool.imap_unordered(_indexed, [(fn, i, t) for i, t in enumerate(tasks)]):
                bar.update(weights[i])
                yield result
    finally:
        bar.close()


def _indexed(item: tuple[Callable, int, object]) -> tuple[int, object]:
    fn, i, task = item
    return i, fn(task)
