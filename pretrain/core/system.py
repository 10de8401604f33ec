"""Facts about the machine that several floors need."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may use (respects taskset / cgroup affinity where exposed)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
