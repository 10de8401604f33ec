"""``vitscale bench train``: training throughput, MFU, memory and step phases per configuration.

A configuration is (model, image size, ZeRO stage, activation checkpointing, ``torch.compile``,
``model.fp8``, data: a synthetic device batch or the real shard loader with ``data.decode`` cpu or
gpu), or timm's ViT in a plain loop. The plan is the grid ``--models x --img-sizes x --zero-stages
x --compile x --act-ckpt`` followed by the configurations of ``--extra``, or a named ``--suite``
(:data:`pretrain.bench.plan.SUITES`, in order of value; ``--tiny`` runs it on stand-ins that
train in seconds on a CPU, a rehearsal). See :mod:`pretrain.bench.plan` for the spelling. Each one
trains our model in a fresh DeepSpeed engine at the largest micro batch that fits (``--micro-batch
auto``) or a fixed one, and reports images/s, MFU, peak memory, the step breakdown, the data-wait
share and which SDPA backend ran (:mod:`pretrain.bench.measure`); ``--timm`` adds timm's ViT-H/14
in a plain torch loop at the micro batch of the fastest ViT-H/14@224 configuration before it.
A ``bestckpt`` configuration takes the activation-checkpointing setting of the fastest earlier
measurement of its model (:func:`pretrain.bench.plan.reference_record`).

This process only plans and records: every configuration (search and measurement) runs in a child
process of its own with a one-rank process group (world size 1), and a measurement that runs out
of memory is retried in a new child at about 3/4 of the micro batch. With one rank, ZeRO-1/2/3
partition nothing (every shard is the whole tensor) but run their own code paths: gradient
buckets, the flat fp32 partition, ZeRO-3's parameter gather/release hooks. Multi-GPU throughput
is what ``vitscale pretrain`` logs; this benchmark is not started under a launcher.

Records are written to ``OUT/<device>-<date>.json`` after every configuration (atomically), so a
run stopped by ``--budget-s`` or killed keeps what it measured; ``bench/results/README.md``
describes the fields.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pretrain.bench.plan import (
    TIMM_MODEL,
    TIMM_REFERENCE,
    Budget,
    Case,
    build_plan,
    case_config,
    reference_record,
    shrink,
    suite_extras,
)
from pretrain.bench.records import (
    RECORD_KEYS,
    device_slug,
    fill_speedups,
    format_table,
    machine_info,
    result_path,
    write_records,
)
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.core.system import available_cpus
from pretrain.model.costs import mfu, mixed_peak, model_costs, peak_flops_for

DEFAULT_MODELS = "vit_b16,vit_l16,vit_h14,vit_h16"
CPU_AUTO_MICRO_BATCH = 8
GPU_SEARCH_START = 8
GPU_ALIGN = 8
OOM_RETRIES = 2

def child_env() -> dict:
    """The environment of a measuring child: a one-rank group on a free port, the package
    importable, and expandable CUDA segments (less fragmentation while searching batch sizes)
    unless ``PYTORCH_CUDA_ALLOC_CONF`` is set."""
    from pretrain.train.spawn import free_port

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_child(job: dict, kill_at: float | None) -> dict:
    """Run ``job`` in ``python -m pretrain.bench.child`` (output to our stderr) and return its
    result; stopped (SIGTERM, then SIGKILL) when ``time.monotonic()`` reaches ``kill_at``."""
    with tempfile.TemporaryDirectory(prefix="vitscale-bench-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.bench.child", str(job_path), str(out_path)],
                                env=child_env(), stdout=sys.stderr, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(None if kill_at is None else max(1.0, kill_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            return {"error": "stopped: it was still running at the --budget-s deadline"}
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if not out_path.exists():
            return {"error": f"the measuring process exited with status {rc} without a result (see stderr)"}
        return json.loads(out_path.read_text())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vitscale bench train", description=doc_help(__doc__.split("\n")[0]),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated variants (grid; '' for none; default {DEFAULT_MODELS}, none with --suite)")
    p.add_argument("--img-sizes", default="224", help="comma-separated image sizes (grid)")
    p.add_argument("--zero-stages", default="1,2,3", help="comma-separated ZeRO stages (grid)")
    p.add_argument("--act-ckpt", default="both", help="activation checkpointing: both, on or off (grid)")
    p.add_argument("--compile", default="both", help="compile the blocks with torch.compile: both, on or off (grid)")
    p.add_argument("--extra", action="append", default=[],
                   metavar="MODEL@SIZE[:zN][:ckpt|:bestckpt][:compile][:fp8[=rowwise]][:shards-cpu|:shards-gpu]",
                   help="configurations after the grid (repeat or comma-separate); unnamed parts: the first "
                        "of --zero-stages, no checkpointing, eager, bf16, a synthetic batch on the device; "
                        "MODEL@SIZE:timm is timm's ViT at the fastest earlier configuration's micro batch")
    p.add_argument("--suite", default=None, help="a named plan, in order of value (gpu: the issue-26 GPU run)")
    p.add_argument("--tiny", action="store_true", help="with --suite: tiny stand-in models (a CPU rehearsal)")
    p.add_argument("--shards", default=None, help="shard set for the shards-cpu / shards-gpu configurations")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="loader processes of the shard-loader configurations (default: the CPUs less 2, >= 1)")
    p.add_argument("--micro-batch", default="auto",
                   help=f"'auto' (GPU: largest that fits, doubling from {GPU_SEARCH_START} then bisecting; "
                        f"CPU: {CPU_AUTO_MICRO_BATCH}) or an integer")
    p.add_argument("--max-micro-batch", type=int, default=512, help="upper end of the auto search")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--phase-steps", type=int, default=3, help="synchronised steps for the step breakdown")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: from the GPU name; none on CPU)")
    p.add_argument("--timm", action="store_true",
                   help=f"also train timm's {TIMM_MODEL} ({TIMM_REFERENCE[0]}@{TIMM_REFERENCE[1]}:timm) right after "
                        f"the grid's last {TIMM_REFERENCE[0]}@{TIMM_REFERENCE[1]} configuration, at the micro batch "
                        f"and flags of the fastest one")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no configuration expected to end after this many seconds; stop what still "
                        "runs at the budget plus 10%% (at least 30 s)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for <device>-<date>.json")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of the table")
    args = p.parse_args(argv)
    if args.micro_batch != "auto":
        try:
            args.micro_batch = int(args.micro_batch)
        except ValueError:
            raise UserError(f"--micro-batch {args.micro_batch!r}: use auto or a positive integer") from None
        if args.micro_batch < 1:
            raise UserError(f"--micro-batch {args.micro_batch}: must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.phase_steps < 1 or args.max_micro_batch < 1:
        raise UserError(f"--steps {args.steps}, --phase-steps {args.phase_steps} and --max-micro-batch "
                        f"{args.max_micro_batch} must be >= 1 and --warmup {args.warmup} >= 0")
    if args.budget_s is not None and args.budget_s <= 0:
        raise UserError(f"--budget-s {args.budget_s}: give a positive number of seconds")
    if args.tiny and not args.suite:
        raise UserError("--tiny runs a suite on stand-in models: give --suite too, e.g. --suite gpu --tiny")
    if args.models is None:
        args.models = "" if args.suite else DEFAULT_MODELS
    if args.suite:
        args.extra = [*suite_extras(args.suite, args.tiny), *args.extra]
    if args.loader_workers is None:
        args.loader_workers = max(1, available_cpus() - 2)
    if args.loader_workers < 1:
        raise UserError(f"--loader-workers {args.loader_workers}: must be >= 1")
    return args


def main(argv: list[str]) -> int:
    """``vitscale bench train [options]``; see ``--help`` and the module docstring."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("vitscale bench train runs its own one-rank processes: start it as a single process, "
                        "not under torchrun / deepspeed / srun with several ranks")
    plan = build_plan(args.models, args.img_sizes, args.zero_stages, args.act_ckpt, args.compile, args.extra,
                      timm=args.timm)
    if any(c.loader for c in plan):
        if not args.shards:
            raise UserError("the plan has shard-loader configurations (shards-cpu / shards-gpu): give --shards DIR "
                            "(`vitscale shards synth` + `vitscale shards write` make a set)")
        from pretrain.data.shard_sets import resolve_shards

        shards = resolve_shards(args.shards, "train", key="--shards")
        args.loader_workers = min(args.loader_workers, len(shards.urls))  # one shard per worker at least
    command = shlex.join(["vitscale", "bench", "train", *argv])
    records, table = BenchRun(args, plan, command, Budget(args.budget_s)).run()
    print(json.dumps(records, indent=1) if args.json else table, flush=True)
    return 0


class BenchRun:
    """Runs the plan, one child process per measurement, and keeps the records."""

    def __init__(self, args: argparse.Namespace, plan: list[Case], command: str, budget: Budget):
        self.args, self.plan, self.command, self.budget = args, plan, command, budget
        self.records: list[dict] = []
        self.searches: dict[tuple, dict] = {}
        self.machine = machine_info()
        self.path: Path | None = None
        self.passes = {"warmup": args.warmup, "steps": args.steps, "phase_steps": args.phase_steps}

    @property
    def peak(self) -> float | None:
        return self.args.peak_flops or peak_flops_for(self.machine["device"])

    def log(self, text: str) -> None:
        print(f"[bench {self.budget.elapsed():6.0f}s] {text}", file=sys.stderr, flush=True)

    def run(self) -> tuple[list[dict], str]:
        """Measure every configuration; returns the records and the table."""
        timm_note = None
        if any(c.framework == "timm" for c in self.plan) and importlib.util.find_spec("timm") is None:
            timm_note = "timm is not installed (pip install timm): no timm baseline"
            self.log(timm_note)
        self.log(f"{len(self.plan)} configurations on {self.machine['device']}, one process each")
        skipped: list[Case] = []
        for i, planned in enumerate(self.plan, 1):
            self.log(f"[{i}/{len(self.plan)}] {planned.label}")
            case = planned if planned.framework == "timm" else self._resolve(planned)
            if case.framework == "timm":
                rec = self._timm(case, timm_note)
            else:
                rec = self._budgeted(case.compile, lambda c=case: self._run_case(c), self._case_record(case))
            if rec["error"] and rec["error"].startswith("skipped"):
                skipped.append(case)  # as resolved: a second run cannot know what this one measured
        if skipped:
            but = "without --suite and --tiny, " if self.args.suite else ""
            self.log(f"skipped for the budget; to measure them, run again with the same options but {but}--models '' "
                     "--extra " + ",".join(c.spec for c in skipped))
        if self.path is not None:
            self.log(f"records: {self.path}")
        return self.records, format_table(self.records, self.machine, self.peak)

    def _resolve(self, case: Case) -> Case:
        """``act_ckpt`` None (``bestckpt``): the setting of the fastest earlier measurement of this
        model and size (:func:`reference_record`), off when there is none."""
        if case.act_ckpt is not None:
            return case
        ref = reference_record(self.records, case)
        ckpt = bool(ref and ref["act_ckpt"])
        self.log(f"  bestckpt: act_ckpt {'on' if ckpt else 'off'} ("
                 + (f"{ref['images_per_s']:.1f} img/s at z{ref['zero_stage']}" if ref else "nothing measured yet")
                 + ")")
        return replace(case, act_ckpt=ckpt)

    def _timm(self, planned: Case, note: str | None) -> dict:
        """timm's ViT of ``planned``'s model at the micro batch, checkpointing and compile flag of
        the fastest earlier measurement of that model (an error record when there is none)."""
        ref = reference_record(self.records, planned)
        rec = self._timm_record(planned, ref)
        if note or ref is None:
            rec["error"] = note or (f"no {planned.model}@{planned.img_size} configuration was measured to compare "
                                    f"with (none succeeded, or none was planned before it: add --extra "
                                    f"{planned.model}@{planned.img_size} ahead of it)")
            self.log(f"  -> {rec['error']}")
            return self._add(rec)
        reference = Case(ref["model"], ref["img_size"], ref["zero_stage"], ref["act_ckpt"], ref["compile"])
        return self._budgeted(reference.compile, lambda: self._run_timm(reference, ref["micro_batch"]), rec)

    def _budgeted(self, compiled: bool, fn: Callable[[], dict], rec: dict) -> dict:
        if not self.budget.allows(compiled):
            rec["error"] = f"skipped: --budget-s {self.args.budget_s:g} reached ({self.budget.elapsed():.0f} s spent)"
            self.log(rec["error"])
            return self._add(rec)
        t0 = time.monotonic()
        try:
            rec.update(fn())
        except RuntimeError as err:
            rec["error"] = str(err)
        rec["duration_s"] = round(time.monotonic() - t0, 1)
        self.budget.record(compiled, rec["duration_s"])
        self._add(rec)
        self.log(self._summary(rec))
        return rec

    def _add(self, rec: dict) -> dict:
        self.records.append(rec)
        fill_speedups(self.records)
        if self.path is None:
            date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
            self.path = result_path(self.args.out, device_slug(self.machine["device"]), date)
        write_records(self.path, self.records)
        return rec

    @staticmethod
    def _summary(rec: dict) -> str:
        if rec["error"]:
            return f"  -> {rec['error']}"
        m = "-" if rec["mfu"] is None else f"{rec['mfu']:.1%}"
        extra = [f"data wait {rec['data_wait_frac']:.1%}"] if rec["loader"] else []
        extra += [f"{rec[k]:.2f}x {what}" for k, what in (("speedup_vs_bf16", "bf16"), ("speedup_vs_timm", "timm"))
                  if rec[k] is not None]
        return (f"  -> micro batch {rec['micro_batch']}: {rec['images_per_s']:.1f} img/s, MFU {m}, "
                f"{rec['peak_mem_gb']:.2f} GB, sdpa {rec['sdpa_backend']}{''.join(', ' + e for e in extra)} "
                f"({rec['duration_s']} s)")

    def _base_record(self) -> dict:
        rec = dict.fromkeys(RECORD_KEYS)
        rec.update({k: self.machine[k] for k in ("device", "cpu", "torch", "deepspeed", "cuda_alloc_conf")})
        rec.update(world_size=1, peak_flops=self.peak, steps=self.args.steps, warmup=self.args.warmup,
                   time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), command=self.command)
        return rec

    def _case_record(self, case: Case) -> dict:
        rec = self._base_record()
        costs = model_costs(case_config(case, 1).model.spec())
        share = costs["fp8_flops_share"] if case.fp8 != "off" else 0.0
        rec.update(model=case.model, framework="vitscale", img_size=case.img_size, zero_stage=case.zero_stage,
                   act_ckpt=case.act_ckpt, compile=case.compile, fp8=case.fp8, loader=case.loader,
                   train_tflops_per_image=costs["train_tflops_per_image"], fp8_flops_share=costs["fp8_flops_share"],
                   peak_flops=mixed_peak(self.peak, share))
        return rec

    def _timm_record(self, planned: Case, ref: dict | None) -> dict:
        from pretrain.bench.timm_baseline import timm_name, timm_spec

        rec = self._base_record()
        rec.update(model=f"timm:{timm_name(planned.model, planned.img_size)}", framework="timm",
                   img_size=planned.img_size, baseline_of=planned.model, fp8="off",
                   train_tflops_per_image=model_costs(timm_spec(planned.model, planned.img_size))[
                       "train_tflops_per_image"])
        if ref is not None:
            rec.update(act_ckpt=ref["act_ckpt"], compile=ref["compile"])
        return rec

    def _child(self, job: dict) -> dict:
        """One child run; raises RuntimeError with the child's error (traceback to stderr)."""
        result = run_child({**job, "passes": self.passes}, self.budget.kill_at())
        if result.get("device_name") and self.machine["device"] != result["device_name"]:
            self.machine["device"] = result["device_name"]
        if result.get("error"):
            if result.get("traceback"):
                print(result["traceback"], file=sys.stderr, flush=True)
            raise RuntimeError(result["error"])
        return result

    def _with_backoff(self, job: dict, micro_batch: int | None, search: dict) -> dict:
        """Run ``job`` at ``micro_batch`` (None: the child searches first); after an OOM retry in a
        new child at ~3/4, up to ``OOM_RETRIES`` times (the micro batch that then fitted replaces
        the searched one for the configurations that share the search). Returns the measurement
        with ``micro_batch`` and ``micro_batch_search``."""
        align = GPU_ALIGN if torch.cuda.is_available() else 1
        tried: list[int] = []
        for _ in range(OOM_RETRIES + 1):
            result = self._child({**job, "micro_batch": micro_batch})
            if result.get("search"):
                found = result["search"]
                search = {"mode": "auto", **found, "limit": self.args.max_micro_batch}
                if "case" in job:
                    self.searches[Case(**job["case"]).search_key] = search
                self.log(f"  micro batch search: {found['trials']} -> {found['best']}")
                if found["best"] is None:
                    raise RuntimeError("does not fit in device memory even at micro batch 1")
                micro_batch = found["best"]
            if result["measurement"] is not None:
                if tried:
                    search = {**search, "oom_backoff": tried}
                    key = Case(**job["case"]).search_key if "case" in job else None
                    if key in self.searches:
                        self.searches[key] = {**self.searches[key], "best": micro_batch}
                return {**result["measurement"], "micro_batch": micro_batch, "micro_batch_search": search}
            tried.append(micro_batch)
            self.log(f"  out of memory at micro batch {micro_batch}: {result['oom']}")
            if micro_batch == 1:
                break
            micro_batch = shrink(micro_batch, align)
        raise RuntimeError(f"out of memory at micro batches {tried}")

    def _run_case(self, case: Case) -> dict:
        if self.args.micro_batch != "auto":
            micro_batch, search = self.args.micro_batch, {"mode": "fixed"}
        elif not torch.cuda.is_available():
            micro_batch, search = CPU_AUTO_MICRO_BATCH, {"mode": "cpu-fixed"}
        elif case.search_key in self.searches:
            search = {**self.searches[case.search_key], "mode": "auto (reused)"}
            micro_batch = search["best"]
            if micro_batch is None:
                raise RuntimeError("does not fit in device memory even at micro batch 1")
        else:
            micro_batch, search = None, {}
        job = {"kind": "case", "case": asdict(case),
               "search": {"start": GPU_SEARCH_START, "limit": self.args.max_micro_batch, "align": GPU_ALIGN},
               "shards": self.args.shards if case.loader else None,
               "workers": self.args.loader_workers if case.loader else 0}
        out = self._with_backoff(job, micro_batch, search)
        costs = model_costs(case_config(case, 1).model.spec())
        peak = mixed_peak(self.peak, costs["fp8_flops_share"] if case.fp8 != "off" else 0.0)
        out["mfu"] = mfu(out["images_per_s"], costs["train_tflops_per_image"] * 1e12, peak, 1)
        self._check_sdpa(case.label, out)
        return out

    def _run_timm(self, reference: Case, micro_batch: int) -> dict:
        from pretrain.bench.timm_baseline import timm_name, timm_spec

        name = timm_name(reference.model, reference.img_size)
        self.log(f"timm baseline: {name} at micro batch {micro_batch} (as {reference.label})")
        job = {"kind": "timm", "reference": asdict(reference)}
        out = self._with_backoff(job, micro_batch, {"mode": f"as {reference.label}"})
        spec = timm_spec(reference.model, reference.img_size)
        out["mfu"] = mfu(out["images_per_s"], model_costs(spec)["train_tflops_per_image"] * 1e12, self.peak, 1)
        self._check_sdpa(f"timm {name}", out)
        return out

    def _check_sdpa(self, label: str, out: dict) -> None:
        check = out["sdpa_check"]
        if check["profiled"] is None:
            self.log(f"  {label}: the profiler saw no SDPA op; reporting the dispatcher's answer "
                     f"{check['dispatcher']!r}")
        elif not check["agree"]:
            self.log(f"  {label}: SDPA ran {check['profiled']!r} but the dispatcher check says "
                     f"{check['dispatcher']!r} (torch.compile or another layout may choose differently)")
