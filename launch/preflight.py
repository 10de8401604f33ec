"""Preflight: check a run config against a cluster before spending GPU hours.

``vitscale preflight --config FILE [--nodes N --gpus-per-node G] [--gpu-mem-gb M] [--json]
[overrides]`` prints one PASS / WARN / FAIL / SKIP line per check, with the fix under each
failure, and exits 1 if anything failed:

1. config: the YAML and overrides load and validate.
2. batch: global batch = micro batch x grad accum x world size, the accumulation derived from
   ``train.global_batch`` when not given (printed), or the nearest valid settings.
3. data.train / data.val: resolved as the loaders resolve them (folder, pattern, glob, comma
   list, URLs; the split used), labels against the model, one shard per dataloader worker of
   every rank for training. fewshot.<name>: every ``fewshot.datasets`` entry resolves, is
   single-label with labels, and has no more classes than the model's features can separate.
4. run dir: ``run.dir`` can be created and written, and its filesystem has room for
   ``checkpoint.keep + 1`` checkpoints (14 B/param with AdamW = 2 bf16 weights + 4 fp32 master
   + 8 moments; 10 B/param with SGD). log.tensorboard / log.wandb: the library of every logging
   sink the config turns on imports here (a FAIL names the package).
5. memory: the per-GPU estimate of launch/memory.py against ``--gpu-mem-gb`` (default: the local
   GPU's memory, else 80 GiB), with its breakdown.
6. sdpa: the attention backend that runs for the configured shapes (pretrain/model/sdpa.py).
   model.fp8 (only when on): torchao imports, and the GPU has compute capability 8.9+ (on a
   machine without a GPU: torchao only; ``vitscale pretrain`` on a CPU runs an emulated FP8 layer).
7. all-reduce: inside a distributed job (``WORLD_SIZE`` > 1) a one-element all-reduce with a
   60 s timeout; skipped otherwise.

Checks 1-4 and 6 (with model.fp8) are :func:`pretrain.train.checks.run_cheap_checks`, which ``vitscale pretrain``
and ``vitscale launch`` also run before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from launch.memory import GIB, estimate_memory
from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.train.checks import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    Check,
    describe_config,
    format_table,
    local_device,
    run_cheap_checks,
)
from pretrain.train.config import Config
from pretrain.train.config_file import load_config
from pretrain.train.recipes import CONFIG_HELP

HEADROOM = 0.9  # fraction of GPU memory the estimate may use before WARN
DEFAULT_GPU_MEM_GIB = 80.0


def check_config(config: str | Path | None, overrides: list[str]) -> tuple[Config | None, Check]:
    """Load and validate; a :class:`UserError` becomes a FAIL line."""
    try:
        cfg = load_config(config, overrides)
    except UserError as err:
        return None, Check("config", FAIL, str(err), "edit the YAML file or the override named above")
    return cfg, describe_config(cfg)


def check_memory(cfg: Config, world_size: int, gpu_mem_gib: float) -> Check:
    est = estimate_memory(cfg, world_size)
    ckpt = str(cfg.model.act_ckpt).lower()
    detail = (f"{est.total / GIB:.1f} of {gpu_mem_gib:.0f} GiB per GPU (ZeRO-{est.stage} over "
              f"{world_size} ranks, micro batch {cfg.train.micro_batch}, act_ckpt={ckpt})")
    data = {"breakdown_gib": {name: round(v, 3) for name, v in est.breakdown()}}
    budget = HEADROOM * gpu_mem_gib * GIB
    if est.total <= budget:
        return Check("memory", PASS, detail, data=data)
    fix = memory_fixes(cfg, world_size, budget)
    if est.total <= gpu_mem_gib * GIB:
        return Check("memory", WARN, f"{detail}: above {HEADROOM:.0%}, fragmentation may OOM", fix, data=data)
    return Check("memory", FAIL, f"{detail}: does not fit", fix, data=data)


def memory_fixes(cfg: Config, world_size: int, budget: float) -> str:
    """Single changes that lower the estimate, each with its new total: the lowest higher ZeRO
    stage that fits (else stage 3; only with more than one rank), activation checkpointing, and
    the largest smaller micro batch that fits (dividing the global batch per rank when one is set)."""
    def total(**changes) -> int:
        sections = {name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in changes.items()}
        return estimate_memory(cfg.replace(**sections), world_size).total

    options: list[tuple[str, int]] = []
    if world_size > 1 and cfg.zero.stage < 3:
        stages = [(s, total(zero={"stage": s})) for s in range(cfg.zero.stage + 1, 4)]
        stage, need = next(((s, t) for s, t in stages if t <= budget), stages[-1])
        options.append((f"zero.stage={stage}", need))
    if not cfg.model.act_ckpt:
        options.append(("model.act_ckpt=true", total(model={"act_ckpt": True})))
    t = cfg.train
    per_rank = t.global_batch // world_size if t.global_batch and t.global_batch % world_size == 0 else None
    for b in range(t.micro_batch - 1, 0, -1):
        if per_rank is not None and per_rank % b:
            continue
        need = total(train={"micro_batch": b, "global_batch": None, "grad_accum": None})
        if need <= budget:
            accum = f"train.grad_accum={per_rank // b}" if per_rank else "a larger train.grad_accum"
            options.append((f"train.micro_batch={b} with {accum} (same global batch)", need))
            break
    text = "; ".join(f"{change} -> {need / GIB:.1f} GiB" for change, need in options)
    if not any(need <= budget for _, need in options):
        text += ("; " if text else "") + "none fits alone: combine them, or use GPUs with more memory"
    return text


def check_allreduce(timeout_s: int = 60) -> Check:
    """All-reduce of ones over the job's ranks must give the world size. Skipped outside a job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return Check("all-reduce", SKIP, "not inside a distributed job (WORLD_SIZE unset or 1): run "
                                         "`vitscale preflight` under srun/torchrun to test the network")
    dist = torch.distributed
    cuda = torch.cuda.is_available()
    owns = not dist.is_initialized()
    device = local_device()
    try:
        if cuda:
            torch.cuda.set_device(device)
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        x = torch.ones(1, device=device)
        dist.all_reduce(x)
        got = int(x.item())
    except Exception as err:  # network and rendezvous failures of any kind become a FAIL line
        return Check("all-reduce", FAIL, f"all-reduce over {world} ranks failed: {type(err).__name__}: {err}",
                     "check MASTER_ADDR/MASTER_PORT reachability, firewalls and NCCL_SOCKET_IFNAME / "
                     "NCCL_IB_HCA; rerun with NCCL_DEBUG=INFO")
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
    if got != world:
        return Check("all-reduce", FAIL, f"all-reduce gave {got}, expected world size {world}",
                     "ranks disagree on WORLD_SIZE: check the launcher command on every node")
    return Check("all-reduce", PASS, f"{world} ranks agree (backend {'nccl' if cuda else 'gloo'})")


def format_memory(check: Check) -> str:
    rows = check.data.get("breakdown_gib", {})
    return "\n".join(["memory per GPU (GiB):"] + [f"  {name:<24} {v:8.2f}" for name, v in rows.items()])


def _default_world(nodes: int | None, gpus: int | None) -> tuple[int, int]:
    if nodes is None and gpus is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return max(1, world // local), local
    default_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return nodes or 1, gpus or default_gpus


def _default_gpu_mem() -> float:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return DEFAULT_GPU_MEM_GIB


def run_all(config: str | Path | None, overrides: list[str], nodes: int, gpus_per_node: int,
            gpu_mem_gib: float) -> list[Check]:
    """Every check in order; stops after the config check if the config does not load."""
    cfg, first = check_config(config, overrides)
    if cfg is None:
        return [first]
    world = nodes * gpus_per_node
    cheap = run_cheap_checks(cfg, world, runs_here=False, probe_gpu=True)
    at = next(i for i, c in enumerate(cheap) if c.name == "sdpa")  # the memory estimate goes before it
    return [*cheap[:at], check_memory(cfg, world, gpu_mem_gib), *cheap[at:], check_allreduce()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale preflight", description=doc_help(__doc__))
    ap.add_argument("--config", required=True, help=CONFIG_HELP)
    ap.add_argument("--nodes", type=int, default=None, help="nodes (default 1, or from WORLD_SIZE in a job)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: the local count, or 1)")
    ap.add_argument("--gpu-mem-gb", type=float, default=None,
                    help=f"memory per GPU in GiB (default: the local GPU's, else {DEFAULT_GPU_MEM_GIB:g})")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_intermixed_args(argv)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.gpu_mem_gb is not None and not args.gpu_mem_gb > 0:
        raise UserError(f"--gpu-mem-gb {args.gpu_mem_gb}: give the memory of one GPU in GiB, e.g. 80")
    nodes, gpus = _default_world(args.nodes, args.gpus_per_node)
    gpu_mem = args.gpu_mem_gb or _default_gpu_mem()
    checks = run_all(args.config, args.overrides, nodes, gpus, gpu_mem)
    failed = any(c.status == FAIL for c in checks)
    rank = int(os.environ.get("RANK", "0"))
    if args.json:
        if rank == 0:
            print(json.dumps({"nodes": nodes, "gpus_per_node": gpus, "gpu_mem_gib": gpu_mem, "ok": not failed,
                              "checks": [asdict(c) for c in checks]}, indent=2))
    elif rank == 0:
        print(f"vitscale preflight: {args.config}, {nodes} node(s) x {gpus} GPU(s) = {nodes * gpus} ranks")
        print(format_table(checks))
        memory = next((c for c in checks if c.name == "memory"), None)
        if memory is not None:
            print(format_memory(memory))
        print("FAILED: fix the lines marked FAIL" if failed else "all checks passed")
    else:
        bad = [c for c in checks if c.status == FAIL]
        if bad:
            print(f"[rank {rank}]\n{format_table(bad)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
