"""Run metrics: throughput, MFU, data-wait share, memory; written to console and JSONL.

Every ``train.log_every`` steps rank 0 appends one JSON object to ``run.dir/metrics.jsonl`` with
at least ``step, loss, lr, grad_norm, images_per_s, mfu, data_wait_frac`` (``mfu`` is null
without a known peak, e.g. on CPU unless ``log.peak_flops`` is given). Eval and event records
carry a ``kind`` field ("eval", "event").
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from pretrain.model.costs import mfu, peak_flops_for


def peak_memory_gb() -> float:
    """Peak accelerator memory allocated (GPU) or peak resident set size (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux


def device_peak_flops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        return peak_flops_for(torch.cuda.get_device_name())
    return None


class Throughput:
    """Images/s, MFU and the share of wall time spent waiting for data over a window."""

    def __init__(self, global_batch: int, train_flops_per_image: float, peak_flops: float | None,
                 world_size: int):
        self.global_batch = global_batch
        self.flops = train_flops_per_image
        self.peak = peak_flops
        self.world = world_size
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.data_wait = 0.0

    def add(self, steps: int, data_wait: float) -> None:
        self.steps += steps
        self.data_wait += data_wait

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        ips = self.steps * self.global_batch / elapsed
        return {
            "images_per_s": ips,
            "mfu": mfu(ips, self.flops, self.peak, self.world),
            "data_wait_frac": min(1.0, self.data_wait / elapsed),
            "step_time_s": elapsed / max(self.steps, 1),
        }


class MetricsLog:
    """Rank 0 writes JSONL (+ TensorBoard when enabled); other ranks write nothing."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool = False):
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("log.tensorboard=true but tensorboard is not installed: pip install 'vitscale[tensorboard]'",
                      file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(finite) + "\n")  # strict JSON: NaN/Inf become null
        except OSError as err:  # a full or read-only disk must not stop training; the checkpoint says why
            if not getattr(self, "_warned", False):
                print(f"metrics: cannot append to {self.path}: {err.strerror or err}; records are dropped",
                      file=sys.stderr)
                self._warned = True
        if self.tb is not None and "step" in record:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def start_progress(self, total: int, initial: int, enabled: bool) -> None:
        """A step progress bar (stderr) on rank 0 when stderr is a terminal; log lines print above it."""
        self.bar = None
        if self.rank == 0 and enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def advance(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.update(1)

    def console(self, text: str) -> None:
        if self.rank != 0:
            return
        if getattr(self, "bar", None) is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def stop_progress(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.stop_progress()
        if self.tb is not None:
            self.tb.close()


def format_train_line(rec: dict, total_steps: int) -> str:
    mfu_txt = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.1f}%"
    gn = rec.get("grad_norm")
    gn_txt = "n/a" if gn is None else f"{gn:.3f}"
    return (f"step {rec['step']:>6}/{total_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
            f"gnorm {gn_txt}  {rec['images_per_s']:.1f} img/s  mfu {mfu_txt}  "
            f"data-wait {100 * rec['data_wait_frac']:.1f}%  mem {rec.get('peak_mem_gb', 0):.2f} GB"
            + (f"  excluded {rec['excluded']}" if rec.get("excluded") else ""))
