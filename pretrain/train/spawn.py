"""Spawn or join a distributed job with torchrun semantics.

``vitscale pretrain ...`` run as a plain command spawns ``--nproc-per-node`` processes through
``torch.distributed.run`` (static rendezvous at ``--master-addr:--master-port``, node
``--node-rank`` of ``--nnodes``), each re-entering the same command. Started by torchrun, the
DeepSpeed launcher (they set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or by ``srun`` with one task
per GPU (``SLURM_PROCID``/``SLURM_NTASKS``), it joins that job instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys

from pretrain.core.errors import UserError


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (torchrun semantics; ignored when started by a launcher)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: GPUs, or 2 on a CPU-only machine)")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument("--master-addr", default="127.0.0.1")
    g.add_argument("--master-port", type=int, default=None, help="default: a free port (one node) or 29500")


def in_launched_job() -> bool:
    """True when a launcher already started this process as one rank of a job."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return _adopt_srun_env()


def _adopt_srun_env() -> bool:
    """``srun --ntasks-per-node=G`` with one task per GPU: map SLURM variables to torch's."""
    env = os.environ
    if "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) <= 1:
        return False
    if env.get("VITSCALE_SPAWNER") or int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) <= 1:
        return False
    if "MASTER_ADDR" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", "29500")
    return True


def default_nproc() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_of(args: argparse.Namespace) -> int:
    return (args.nproc_per_node or default_nproc()) * args.nnodes


def spawn(args: argparse.Namespace, command: str, argv: list[str]) -> int:
    """Run ``python -m pretrain COMMAND argv`` on ``nproc_per_node`` local processes; the exit
    status is the job's (0 only when every rank exited 0)."""
    nproc = args.nproc_per_node or default_nproc()
    if nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"launch: --nproc-per-node {nproc}, --nnodes {args.nnodes}, --node-rank "
                        f"{args.node_rank}: need nproc >= 1, nnodes >= 1 and 0 <= node-rank < nnodes")
    port = args.master_port or (free_port() if args.nnodes == 1 else 29500)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
           f"--master-port={port}", "--max-restarts=0", "-m", "pretrain", command, *argv]
    env = dict(os.environ, VITSCALE_SPAWNER="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1")
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _forward_to_ranks(proc.pid))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _forward_to_ranks(agent_pid: int) -> None:
    """Preemption: pass the signal to the rank processes as SIGUSR1 (save and exit 0); the
    torchrun agent itself is left alone so it does not tear the ranks down mid-save."""
    import psutil

    try:
        ranks = psutil.Process(agent_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGUSR1)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def strip_launch_args(argv: list[str]) -> list[str]:
    """``argv`` without the launch flags (the spawned ranks must not spawn again)."""
    flags = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out
