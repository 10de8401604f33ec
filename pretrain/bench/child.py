"""The process one measurement of ``vitscale bench train`` runs in (one rank, world size 1):
``python -m pretrain.bench.child JOB.json RESULT.json``.

A child per configuration keeps configurations apart: DeepSpeed ZeRO-3 keeps a destroyed engine
reachable once it has run two steps, dynamo caches compiled code, and the CUDA allocator stays
fragmented after an OOM. The parent (:mod:`pretrain.bench.train`) sets the one-rank group
variables (``RANK=0 WORLD_SIZE=1 ...``); the child joins that group, runs the job and writes
its result as JSON (also for a failed job: ``{"error", "traceback"}``).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.bench.measure import EngineProbe, Passes, measure_engine
from pretrain.bench.plan import Case, largest_fitting
from pretrain.bench.timm_baseline import measure_timm
from pretrain.train.engine import destroy, init_distributed


def run_job(job: dict) -> dict:
    """Run one job of :mod:`pretrain.bench.train` in this process.

    ``{"kind": "case", "case": {...}, "micro_batch": N or None, "search": {"start", "limit",
    "align"}, "passes": {...}, "shards": DIR or None, "workers": W}``: with ``micro_batch`` None,
    first the largest fitting micro batch (result ``"search": {"best", "trials", "probe_stage"}``),
    then the measurement at it (a shard-loader case reads ``shards`` with ``workers`` processes).
    ``{"kind": "timm", "reference": {...}, "micro_batch": N, "passes": {...}}``: timm's baseline.
    The result holds ``"measurement"`` (None when it did not fit) and ``"oom"`` (the message).
    """
    passes = Passes(**job["passes"])
    if job["kind"] == "timm":
        return _attempt(lambda: measure_timm(Case(**job["reference"]), job["micro_batch"], passes))
    case = Case(**job["case"])
    out: dict = {"search": None}
    micro_batch = job["micro_batch"]
    if micro_batch is None:
        probe = EngineProbe(case)
        try:
            found = largest_fitting(probe, job["search"]["start"], job["search"]["limit"], job["search"]["align"])
        finally:
            probe.close()
        out["search"] = {"best": found.best, "trials": found.trials, "probe_stage": probe.case.zero_stage}
        if found.best is None:
            return {**out, "measurement": None, "oom": "does not fit even at micro batch 1"}
        micro_batch = found.best
    return {**out, **_attempt(lambda: measure_engine(case, micro_batch, passes, job.get("shards"),
                                                      job.get("workers", 0)))}


def _attempt(fn: Callable[[], dict]) -> dict:
    try:
        return {"measurement": fn(), "oom": None}
    except torch.cuda.OutOfMemoryError as err:
        return {"measurement": None, "oom": str(err)[:300]}


def main(argv: list[str]) -> int:
    """``python -m pretrain.bench.child JOB.json RESULT.json``: run the job, write the result
    (also for a failed job: ``{"error", "traceback"}``); exit status 0 when a result was written."""
    job_path, result_path = (Path(a) for a in argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed()
    try:
        result = run_job(json.loads(job_path.read_text()))
    except Exception as err:  # reported to the parent, which records it and goes on
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                  "traceback": traceback.format_exc()}
    result["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
