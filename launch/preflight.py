"""Preflight: check a run config against a cluster before spending GPU hours.

``vitscale preflight --config FILE [--nodes N --gpus-per-node G] [--gpu-mem-gb M] [--json]
[overrides]`` prints one PASS / WARN / FAIL / SKIP line per check, with the fix under each
failure, and exits 1 if anything failed:

1. config: the YAML and overrides load and validate.
2. batch: global batch = micro batch x grad accum x world size (``TrainConfig.check_world``).
3. shards: at least one shard per data-loader worker of every rank (world x max(1, workers)).
4. run dir: ``run.dir`` can be created and written, and its filesystem has room for
   ``checkpoint.keep + 1`` checkpoints of ``checkpoint_bytes`` each (launch/memory.py:
   14 B/param with AdamW = 2 bf16 weights + 4 fp32 master + 8 moments; 10 B/param with SGD).
5. memory: the per-GPU estimate of launch/memory.py against ``--gpu-mem-gb`` (default: the local
   GPU's memory, else 80 GiB), with its breakdown.
6. sdpa: the attention backend that runs for the configured shapes (pretrain/sdpa_check.py).
7. all-reduce: inside a distributed job (``WORLD_SIZE`` > 1) a one-element all-reduce with a
   60 s timeout; skipped otherwise.

:func:`run_cheap_checks` (config, batch, shards, run dir, sdpa) is what ``vitscale pretrain``
runs at start (``raise_on_failure(run_cheap_checks(cfg, world))``); with synthetic data it takes
milliseconds and allocates only tiny tensors, on the rank's own GPU and only inside a rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from launch.memory import GIB, checkpoint_bytes, estimate_memory, param_count
from pretrain.core.errors import UserError
from pretrain.model.sdpa import SdpaReport, flash_blockers, sdpa_report
from pretrain.train.config import Config, load_config

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
HEADROOM = 0.9  # fraction of GPU memory the estimate may use before WARN
DEFAULT_GPU_MEM_GIB = 80.0
SHARD_FIX = "`vitscale shards write --samples-per-shard N` with a smaller N writes more shards"


@dataclass
class Check:
    """One line of the report. ``fix`` says what to change when the status is WARN or FAIL."""

    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_config(config: str | Path | None, overrides: list[str]) -> tuple[Config | None, Check]:
    """Load and validate; a :class:`UserError` becomes a FAIL line."""
    try:
        cfg = load_config(config, overrides)
    except UserError as err:
        return None, Check("config", FAIL, str(err), "edit the YAML file or the override named above")
    return cfg, describe_config(cfg)


def describe_config(cfg: Config) -> Check:
    spec = cfg.model.spec()
    return Check("config", PASS,
                 f"{cfg.model.name} {spec.img_size}px: {param_count(spec) / 1e6:.1f}M params, {spec.seq_len} "
                 f"tokens, head_dim {spec.head_dim}; ZeRO-{cfg.zero.stage}, {cfg.optim.name}, "
                 f"{'bf16' if cfg.train.bf16 else 'fp32'}")


def check_batch(cfg: Config, world_size: int) -> Check:
    t = cfg.train
    got = t.micro_batch * t.grad_accum * world_size
    try:
        t.check_world(world_size)
    except UserError as err:
        per = t.micro_batch * world_size
        hint = (f"train.grad_accum={t.global_batch // per}" if t.global_batch % per == 0
                else f"a train.micro_batch that divides {t.global_batch} / {world_size} ranks")
        return Check("batch", FAIL, str(err),
                     f"use {hint}, run on a world size that divides the global batch, "
                     f"or drop train.global_batch")
    unset = "" if t.global_batch else " (train.global_batch not set)"
    return Check("batch", PASS, f"global batch {got} = micro {t.micro_batch} x accum {t.grad_accum} x "
                                f"{world_size} ranks{unset}")


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def list_shards(train: str) -> list[str] | None:
    """Shard list of ``data.train``: None for "synthetic"; a directory's ``index.json`` train split;
    a brace pattern (``a-{000000..000099}.tar``); a glob; several joined by ``::``; else the path."""
    if train == "synthetic":
        return None
    shards: list[str] = []
    for part in train.split("::"):
        p = Path(part)
        if _is_local(part) and p.is_dir():
            index = p / "index.json"
            if not index.is_file():
                raise UserError(f"data.train={part!r} is a directory without index.json: write shards "
                                f"with `vitscale shards write`, or give a brace pattern like "
                                f"dir/train-{{000000..000099}}.tar")
            try:
                names = json.loads(index.read_text())["splits"]["train"]["shards"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"{index} has no readable splits.train.shards list ({err!r}): "
                                f"rewrite it with `vitscale shards write`") from None
            shards += [str(p / (n if isinstance(n, str) else n.get("name", ""))) for n in names]
        elif "{" in part:
            import braceexpand

            shards += list(braceexpand.braceexpand(part))
        elif _is_local(part) and glob.has_magic(part):
            shards += sorted(glob.glob(part))
        else:
            shards.append(part)
    return shards


def check_shards(cfg: Config, world_size: int) -> Check:
    try:
        shards = list_shards(cfg.data.train)
    except UserError as err:
        return Check("shards", FAIL, str(err), "point data.train at a shard directory or pattern")
    if shards is None:
        return Check("shards", SKIP, "data.train=synthetic: no shards to split")
    missing = [s for s in shards if _is_local(s) and not Path(s).exists()]
    if missing:
        return Check("shards", FAIL,
                     f"{len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})",
                     "fix data.train or write the missing shards")
    workers = max(1, cfg.data.workers)
    need = world_size * workers
    if len(shards) >= need:
        return Check("shards", PASS, f"{len(shards)} shards for {world_size} ranks x {workers} workers",
                     data={"shards": len(shards)})
    fit = len(shards) // world_size
    fewer = (f"lower data.workers to {fit}" if fit >= 1 else
             f"use fewer than {len(shards) + 1} ranks")
    return Check("shards", FAIL,
                 f"{len(shards)} shards < {world_size} ranks x {workers} workers = {need}: some workers "
                 f"would get no shard (and ranks would see different step counts)",
                 f"{fewer}, or write at least {need} shards: {SHARD_FIX}", data={"shards": len(shards)})


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _bytes_under(path: Path, max_files: int = 20000) -> int:
    """Bytes of the regular files under ``path``, counting at most ``max_files`` files (an
    undercount only makes the disk check stricter; it keeps a mistaken run.dir=/ cheap)."""
    if not path.is_dir():
        return 0
    total = 0
    for count, f in enumerate(path.rglob("*")):
        if count >= max_files:
            break
        if f.is_file() and not f.is_symlink():
            total += f.stat().st_size
    return total


def check_run_dir(cfg: Config) -> list[Check]:
    """Writable (a temp file is created and removed where run.dir is or would be created; nothing
    else is created) and room for ``checkpoint.keep + 1`` checkpoints of
    :func:`launch.memory.checkpoint_bytes` each. Bytes already under ``run.dir`` count as
    available, since old checkpoints are rotated out as new ones land (a resumed run); one new
    checkpoint must always fit."""
    run_dir = Path(cfg.run.dir)
    base = _existing_ancestor(run_dir)
    fix = "set run.dir to a writable directory on a shared filesystem"
    if not base.is_dir():
        return [Check("run dir", FAIL,
                      f"run.dir={str(run_dir)!r} cannot be created: {base} is not a directory", fix)]
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".vitscale-preflight-"):
            pass
    except OSError as err:
        return [Check("run dir", FAIL, f"run.dir={str(run_dir)!r}: cannot write in {base} ({err.strerror})",
                      f"{fix}, or fix the permissions of {base}")]
    where = "exists" if base == run_dir.absolute() else f"will be created under {base}"
    checks = [Check("run dir", PASS, f"{run_dir} {where}, writable")]
    params = param_count(cfg.model.spec())
    one = checkpoint_bytes(params, cfg.optim.name)
    total = one * (cfg.checkpoint.keep + 1)
    existing = _bytes_under(run_dir)
    need = max(one, total - existing)
    free = shutil.disk_usage(base).free
    detail = (f"{_gib(free)} free; {cfg.checkpoint.keep} + 1 checkpoints x {_gib(one)} "
              f"({one // params} B/param) = {_gib(total)}"
              + (f", {_gib(existing)} already in run.dir" if existing else ""))
    if free < need:
        checks.append(Check("disk", FAIL, detail,
                            f"free {_gib(need - free)} more, lower checkpoint.keep, or {fix}"))
    else:
        checks.append(Check("disk", PASS, detail))
    return checks


def sdpa_shapes(cfg: Config) -> dict:
    spec = cfg.model.spec()
    return {"batch": cfg.train.micro_batch, "heads": spec.heads, "seq_len": spec.seq_len,
            "head_dim": spec.head_dim, "dtype": torch.bfloat16 if cfg.train.bf16 else torch.float32,
            "dropout_p": spec.attn_dropout}


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` with CUDA (so ranks do not all touch GPU 0), else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def check_sdpa(cfg: Config, device: torch.device | str | None = None, probe: bool = True) -> Check:
    """The backend SDPA runs for the configured shapes. With ``probe=False`` on a CUDA machine only
    the documented constraints (dtype, head_dim) are checked, without touching the GPU."""
    shapes = sdpa_shapes(cfg)
    dev = torch.device(device) if device is not None else local_device()
    kind = str(shapes["dtype"]).removeprefix("torch.")
    what = (f"heads {shapes['heads']}, seq {shapes['seq_len']}, head_dim {shapes['head_dim']}, "
            f"{kind} on {dev.type}")
    if dev.type == "cuda" and not probe:
        report = SdpaReport(backend="not probed")
        what += ": not probed in this launcher process, which must not hold a GPU context"
    else:
        report = sdpa_report(**shapes, device=dev)
        what += f": {report.backend}"
    if report.backend == "flash":
        return Check("sdpa", PASS, what)
    gpu_blockers = [r for r in flash_blockers(shapes["head_dim"], shapes["dtype"], "cpu")
                    if not r.startswith("device is")]
    probed = report.backend != "not probed"
    reasons = (flash_blockers(shapes["head_dim"], shapes["dtype"], dev) if probed else gpu_blockers)
    reasons += report.rejected.get("flash", [])
    fix = "; ".join(dict.fromkeys(reasons)) or "see the reason above"
    if cfg.model.require_flash and (probed or gpu_blockers):
        return Check("sdpa", FAIL, f"{what}, but model.require_flash=true",
                     f"{fix}; or set model.require_flash=false")
    if dev.type != "cuda" or not probed:
        note = ("these shapes are flash-eligible on an sm80+ GPU" if not gpu_blockers
                else "flash will not run on a GPU either: " + "; ".join(gpu_blockers))
        where = "" if not probed else "no GPU here; "
        return Check("sdpa", WARN if gpu_blockers else PASS, f"{what} ({where}{note})",
                     fix if gpu_blockers else "")
    return Check("sdpa", WARN, f"{what}: expected flash on Ampere/Hopper in bf16", fix)


def run_cheap_checks(cfg: Config, world_size: int, probe_gpu: bool | None = None) -> list[Check]:
    """Config, batch arithmetic, shards, run dir (+ disk), SDPA backend: milliseconds with
    synthetic data. ``vitscale pretrain`` calls this at start; pass the result to
    :func:`raise_on_failure` to stop on a FAIL.

    ``probe_gpu``: whether the SDPA check may run tiny tensors on this rank's GPU. By default only
    inside a rank (``LOCAL_RANK`` set): a launcher process that spawns the ranks must not create a
    CUDA context (it would hold GPU memory for the whole run), so there only dtype and head_dim
    are checked. CPU machines always probe.
    """
    probe = ("LOCAL_RANK" in os.environ) if probe_gpu is None else probe_gpu
    return [describe_config(cfg), check_batch(cfg, world_size), check_shards(cfg, world_size),
            *check_run_dir(cfg), check_sdpa(cfg, probe=probe)]


def raise_on_failure(checks: list[Check]) -> None:
    """One :class:`UserError` listing every FAIL with its fix; nothing if none failed."""
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        lines = [f"{c.name}: {c.detail} -> fix: {c.fix}" for c in failed]
        raise UserError("preflight failed: " + " | ".join(lines))


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
        need = total(train={"micro_batch": b, "global_batch": None, "grad_accum": 1})
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


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


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
    *checks, sdpa = run_cheap_checks(cfg, world, probe_gpu=True)
    return [*checks, check_memory(cfg, world, gpu_mem_gib), sdpa, check_allreduce()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run recipe YAML")
    ap.add_argument("--nodes", type=int, default=None, help="nodes (default 1, or from WORLD_SIZE in a job)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: the local count, or 1)")
    ap.add_argument("--gpu-mem-gb", type=float, default=None,
                    help=f"memory per GPU in GiB (default: the local GPU's, else {DEFAULT_GPU_MEM_GIB:g})")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_intermixed_args(argv)
    nodes, gpus = _default_world(args.nodes, args.gpus_per_node)
    if nodes < 1 or gpus < 1:
        raise UserError(f"--nodes {nodes} --gpus-per-node {gpus}: both must be >= 1")
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
