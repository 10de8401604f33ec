"""Run metrics: throughput, MFU, data-wait share, memory, run health; where they are written.

Every ``train.log_every`` steps rank 0 appends one JSON object to ``run.dir/metrics.jsonl`` with
at least ``step, loss, lr, grad_norm, images_per_s, mfu, data_wait_frac`` (``mfu`` is null
without a known peak, e.g. on CPU unless ``log.peak_flops`` is given; with ``model.fp8`` it is
measured against the bf16 / FP8 mixed peak, see :mod:`pretrain.model.costs`). Eval, few-shot and
event records carry a ``kind`` field ("eval", "fewshot", "event"). Every record goes through one
call, :meth:`MetricsLog.write`, to every sink (:mod:`pretrain.train.sinks`): metrics.jsonl always,
TensorBoard and Weights & Biases when ``log.tensorboard`` / ``log.wandb`` turn them on.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from pretrain.model.costs import mfu, mixed_peak, peak_flops_for
from pretrain.train.sinks import METRICS_FILE, SINKS, JsonlSink, enabled_sinks


def peak_memory_gb() -> float:
    """Peak accelerator memory allocated (GPU) or peak resident set size (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux


def device_peak_flops(configured: float | None, fp8_share: float = 0.0) -> float | None:
    """The MFU denominator per device: the dense bf16 peak (``log.peak_flops``, else the table by
    GPU name; None on CPU), mixed with the FP8 peak for the ``fp8_share`` of FLOPs that run in FP8
    (``model.fp8``; :func:`pretrain.model.costs.mixed_peak`)."""
    peak = configured or (peak_flops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    return mixed_peak(peak, fp8_share)


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


class HealthWindow:
    """What the console's health line at an evaluation sums up: lost samples, skipped steps, the
    data-wait share of the wall time and the seconds checkpoints held training up, since the
    previous evaluation (or this process's start)."""

    def __init__(self, step: int, lost: int, skipped: int):
        self.reset(step, lost, skipped)

    def reset(self, step: int, lost: int, skipped: int) -> None:
        self.step, self.lost, self.skipped = step, lost, skipped
        self.t0 = time.perf_counter()
        self.wait = self.blocked = 0.0

    def add(self, wait: float = 0.0, blocked: float = 0.0) -> None:
        self.wait += wait
        self.blocked += blocked

    def line(self, step: int, lost: int, skipped: int) -> str:
        """The line for an evaluation at ``step`` (``lost``, ``skipped``: the run's totals now);
        the window then starts again."""
        share = self.wait / max(time.perf_counter() - self.t0, 1e-9)
        text = (f"health @ step {step} (since step {self.step}): {lost - self.lost} lost samples, "
                f"{skipped - self.skipped} skipped steps, data-wait {100 * min(share, 1.0):.1f}%, "
                f"checkpoint blocking {self.blocked:.2f} s")
        self.reset(step, lost, skipped)
        return text


class MetricsLog:
    """Rank 0 sends every record to its sinks (metrics.jsonl, plus TensorBoard / W&B when the
    ``log`` section turns them on; :data:`SINKS`) and prints the console lines; other ranks
    write nothing. The optional sinks start with :meth:`open`, once the run dir exists."""

    def __init__(self, run_dir: Path, rank: int, log=None):
        self.rank, self.run_dir, self.log_cfg = rank, Path(run_dir), log
        self.path = self.run_dir / METRICS_FILE
        self.sinks: list = [JsonlSink(self.run_dir)] if rank == 0 else []

    def open(self, config: dict) -> None:
        """Start the optional sinks (rank 0); ``config`` is what W&B records as the run's config."""
        if self.rank != 0 or self.log_cfg is None:
            return
        for key in enabled_sinks(self.log_cfg):
            self.sinks.append(SINKS[key](self.run_dir, self.log_cfg, config))

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        for sink in self.sinks:
            sink.write(record)

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

    def close(self, failed: bool = False) -> None:
        """End the progress bar and the sinks (``failed``: the run ends with an error)."""
        self.stop_progress()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)


def format_train_line(rec: dict, total_steps: int) -> str:
    mfu_txt = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.1f}%"
    gn = rec.get("grad_norm")
    gn_txt = "n/a" if gn is None else f"{gn:.3f}"
    return (f"step {rec['step']:>6}/{total_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
            f"gnorm {gn_txt}  {rec['images_per_s']:.1f} img/s  mfu {mfu_txt}  "
            f"data-wait {100 * rec['data_wait_frac']:.1f}%  mem {rec.get('peak_mem_gb', 0):.2f} GB"
            + (f"  excluded {rec['excluded']}" if rec.get("excluded") else ""))
