"""Facts about the machine that several floors need."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may use (respects taskset / cgroup affinity where exposed)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def gpu_compute_capability(index: int = 0) -> tuple[int, int] | None:
    """Compute capability of visible GPU ``index`` as ``nvidia-smi`` reports it (``(9, 0)`` for an
    H100), without creating a CUDA context in this process (a launcher must leave the GPUs to its
    ranks); None when it cannot be read (no driver, an old driver, no such GPU)."""
    import subprocess

    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    cmd = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    if visible:
        if index >= len(visible):
            return None
        cmd += ["-i", visible[index]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.split()
        major, minor = out[0 if visible else index].split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
