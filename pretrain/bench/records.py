"""The records ``vitscale bench train`` writes (``bench/results/<device>-<date>.json``, fields in
``bench/results/README.md``), the machine they ran on, and the table it prints."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RECORD_KEYS = ("model", "framework", "img_size", "device", "cpu", "torch", "deepspeed", "world_size", "zero_stage",
               "act_ckpt", "compile", "fp8", "loader", "micro_batch", "images_per_s", "mfu", "peak_mem_gb",
               "step_time_s", "data_wait_frac", "step_breakdown", "sdpa_backend", "sdpa_check", "compile_stats",
               "speedup_vs_timm", "speedup_vs_bf16", "baseline_of", "train_tflops_per_image", "fp8_flops_share",
               "peak_flops", "micro_batch_search", "final_loss", "steps", "warmup", "duration_s", "error",
               "cuda_alloc_conf", "time", "command")


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def result_path(out: Path, slug: str, date: str) -> Path:
    """``OUT/<slug>-<date>.json``, or ``-2``, ``-3`` ... when that file already exists."""
    path, n = out / f"{slug}-{date}.json", 2
    while path.exists():
        path, n = out / f"{slug}-{date}-{n}.json", n + 1
    return path


def write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)


def fill_speedups(records: list[dict]) -> None:
    """``speedup_vs_timm`` = images/s / the timm baseline's images/s, on our records of the model
    and size that baseline copies (``baseline_of``) fed, like it, by the synthetic device batch;
    ``speedup_vs_bf16`` = images/s / images/s of
    the same configuration without FP8, on FP8 records. Null where there is nothing to compare."""
    timm = {(r["baseline_of"], r["img_size"]): r for r in reversed(records)
            if r["framework"] == "timm" and r["images_per_s"]}
    ours = [r for r in records if r["framework"] == "vitscale" and r["images_per_s"]]
    for r in records:
        ours_on_device = r["framework"] == "vitscale" and r["images_per_s"] and not r["loader"]
        base = timm.get((r["model"], r["img_size"])) if ours_on_device else None
        r["speedup_vs_timm"] = round(r["images_per_s"] / base["images_per_s"], 3) if base else None
        same = [o for o in ours if o["fp8"] == "off" and all(o[k] == r[k] for k in _SAME_CONFIG)]
        bf16 = same[0] if same and r["fp8"] not in (None, "off") and r["images_per_s"] else None
        r["speedup_vs_bf16"] = round(r["images_per_s"] / bf16["images_per_s"], 3) if bf16 else None


_SAME_CONFIG = ("model", "img_size", "zero_stage", "act_ckpt", "compile", "loader")


def gpu_name() -> str:
    """Name of the first visible GPU from ``nvidia-smi`` (this process never initialises CUDA,
    so that every child starts with a whole device); ``"cuda"`` if it cannot be read."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"] + (["-i", visible] if visible else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "cuda"
    return out.strip().splitlines()[0].strip() if out.strip() else "cuda"


def machine_info() -> dict:
    """Device name (GPU or ``"cpu"``), CPU model and library versions for every record."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = None
    cuda = torch.cuda.is_available()
    return {"device": gpu_name() if cuda else "cpu", "cpu": cpu, "torch": torch.__version__, "deepspeed": ds_version,
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True") if cuda else None}


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale if scale != 1.0 else value, spec)


def format_table(records: list[dict], machine: dict, peak: float | None) -> str:
    """The human summary: one line per record under a line naming the machine."""
    peak_txt = (f"peak {peak / 1e12:.0f} TFLOP/s bf16 (FP8 rows: mixed, see peak_flops)" if peak else
                "no peak FLOP/s known (MFU -)")
    lines = [f"machine: {machine['device']}, CPU {machine['cpu']}, torch {machine['torch']}, "
             f"deepspeed {machine['deepspeed']}, {peak_txt}",
             f"{'model':<40}{'zero':>5}{'ckpt':>5}{'comp':>5}{'mb':>5}{'img/s':>10}{'MFU':>7}{'mem GB':>8}"
             f"{'sdpa':>11}{'fwd ms':>8}{'bwd ms':>8}{'opt ms':>8}{'data ms':>8}{'vs timm':>8}  note"]
    yes = {True: "on", False: "off", None: "-"}
    for r in records:
        b = r["step_breakdown"] or {}
        what = r["model"] + "@" + str(r["img_size"]) + ("" if r["fp8"] in (None, "off") else f" fp8-{r['fp8']}") + \
            (f" shards-{r['loader']}" if r["loader"] else "")
        lines.append(
            f"{what:<40}{_fmt(r['zero_stage'], 'd'):>5}{yes[r['act_ckpt']]:>5}"
            f"{yes[r['compile']]:>5}{_fmt(r['micro_batch'], 'd'):>5}{_fmt(r['images_per_s'], '.1f'):>10}"
            f"{_fmt(r['mfu'], '.1%'):>7}{_fmt(r['peak_mem_gb'], '.2f'):>8}{r['sdpa_backend'] or '-':>11}"
            f"{_fmt(b.get('forward_s'), '.1f', 1e3):>8}{_fmt(b.get('backward_s'), '.1f', 1e3):>8}"
            f"{_fmt(b.get('optimizer_s'), '.1f', 1e3):>8}{_fmt(b.get('data_wait_s'), '.2f', 1e3):>8}"
            f"{_fmt(r['speedup_vs_timm'], '.2f'):>8}  {_note(r)}")
    return "\n".join(lines)


def _note(rec: dict) -> str:
    if rec["error"]:
        return rec["error"]
    notes = []
    if rec["speedup_vs_bf16"] is not None:
        notes.append(f"{rec['speedup_vs_bf16']:.2f}x bf16")
    if rec["loader"] and rec["data_wait_frac"] is not None:
        notes.append(f"data wait {rec['data_wait_frac']:.1%} of the step")
    if (rec["compile_stats"] or {}).get("recompile_limit_hits"):
        notes.append("partly eager (dynamo recompile limit hit)")
    check = rec["sdpa_check"] or {}
    if check.get("profiled") and not check.get("agree"):
        notes.append(f"dispatcher check said {check['dispatcher']}")
    if (rec["micro_batch_search"] or {}).get("oom_backoff"):
        notes.append(f"OOM at {rec['micro_batch_search']['oom_backoff']}, backed off")
    return "; ".join(notes)
