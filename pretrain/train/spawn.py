"""Spawn or join a distributed job with torchrun semantics, and own the ranks for their life.

``vitscale pretrain ...`` run as a plain command starts ``--nproc-per-node`` ranks through
torch's elastic agent (torchrun's own launcher: static rendezvous at ``--master-addr:--master-port``,
node ``--node-rank`` of ``--nnodes``), each re-entering the same command. Started by torchrun, the
DeepSpeed launcher (they set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or by ``srun`` with one task
per GPU (``SLURM_PROCID``/``SLURM_NTASKS``), it joins that job instead.

The agent runs in a background thread of the ``vitscale`` process itself (torch registers its
own signal handlers only on the main thread), so this process owns every way the job can end:

- SIGTERM / SIGUSR1 (SLURM preemption, sent to this process or its process group), any number
  of times: passed to the ranks as SIGUSR1; they save after the same step and exit 0, and so
  does this process. Ctrl-C does the same; a second Ctrl-C kills the ranks at once.
- this process killed (``kill -9``, the OOM killer, a node agent): every rank has a parent-death
  signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) and ends within a second; the latest checkpoint
  stays as it is, and relaunching resumes from it.
- a rank stops on a user error (exit 2): the ranks write their messages to a folder this
  process reads, which prints the root cause once and exits 2, without torchrun's traceback.
- a rank dies (a bug, a signal): one line naming the rank and how it ended (a bug's traceback is
  printed by the rank itself), exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import psutil

from pretrain.core.errors import UserError

ERROR_DIR_ENV = "VITSCALE_ERROR_DIR"
LAUNCHER_ENV = "VITSCALE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (torchrun semantics; ignored when started by a launcher)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: GPUs, or 2 on a CPU-only machine)")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument("--master-addr", default="127.0.0.1")
    g.add_argument("--master-port", type=int, default=None, help="default: a free port (one node) or 29500")


def check_launch_args(args: argparse.Namespace) -> None:
    """One line for launch flags that cannot work, before anything starts."""
    nproc = args.nproc_per_node
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc-per-node {nproc}: must be >= 1 (processes on this node)")
    if args.nnodes < 1:
        raise UserError(f"--nnodes {args.nnodes}: must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UserError(f"--master-port {args.master_port}: must be a TCP port in 1..65535")


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


# ---- inside a rank ----

def bind_to_launcher() -> None:
    """In a rank started by :func:`spawn`: die with the launcher (parent-death signal); exit at
    once if it is already gone."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher):
        os._exit(1)


def report_rank_error(message: str, secondary: bool) -> bool:
    """In a rank started by :func:`spawn`: hand a user error's message to the launcher, which
    prints it once for the job. ``secondary``: a consequence of another rank's failure. Returns
    False outside such a rank (the caller prints the message itself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    kind = "peer" if secondary else "user"
    (Path(folder) / f"{kind}-rank{int(os.environ.get('RANK', '0')):05d}.txt").write_text(message)
    return True


def exit_rank(code: int) -> None:
    """End a rank at once with ``code``, without interpreter teardown. After an error its process
    group may still have transport threads talking to dead peers; after a finished run (files
    closed, process group left) the C++ objects of torch.distributed and DeepSpeed still die in
    static destructors, and one of them finding a joinable thread aborts the process ("terminate
    called without an active exception", SIGABRT, rc 1 for a run that succeeded: seen about once
    in 20 runs). Skipping the teardown skips both; stdout and stderr are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- the launcher ----

class _Supervisor:
    """Signal handlers of the launcher: re-entrant and idempotent (a flag and a signal each)."""

    def __init__(self, command: str):
        self.command = command
        self.interrupts = 0
        self.me = psutil.Process()

    def _ranks(self) -> list[psutil.Process]:
        try:
            return self.me.children(recursive=False)
        except psutil.Error:
            return []

    def _send(self, sig: int) -> None:
        for rank in self._ranks():
            with contextlib.suppress(psutil.Error):
                rank.send_signal(sig)

    def preempt(self, signum, frame) -> None:
        self._send(signal.SIGUSR1)

    def interrupt(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            print(f"vitscale {self.command}: interrupted: every rank saves after this step and stops "
                  f"(Ctrl-C again to kill them without saving)", file=sys.stderr, flush=True)
            self._send(signal.SIGUSR1)
        else:
            self._send(signal.SIGKILL)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.preempt)
        signal.signal(signal.SIGUSR1, self.preempt)
        signal.signal(signal.SIGINT, self.interrupt)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def spawn(args: argparse.Namespace, command: str, argv: list[str], module: str = "pretrain") -> int:
    """Run ``python -m MODULE COMMAND argv`` on ``nproc_per_node`` local ranks (see the module
    docstring); the exit status is the job's: 0 when every rank finished or was preempted and
    saved, 2 for a user error, 1 otherwise. ``module`` is the ranks' entry point: ``pretrain``
    (the CLI) for every job; the launcher's own tests give a rank that imports no DeepSpeed."""
    check_launch_args(args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    nproc = args.nproc_per_node or default_nproc()
    # one node without a given port: torchrun's standalone rendezvous binds a free port itself (no
    # window between finding a free port and using it, in which a parallel job could take it)
    standalone = args.nnodes == 1 and not args.master_port
    rendezvous = (["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4()}"] if standalone
                  else [f"--master-addr={args.master_addr}", f"--master-port={args.master_port or 29500}"])
    errors = tempfile.mkdtemp(prefix="vitscale-errors-")
    os.environ.update({"VITSCALE_SPAWNER": "1", "PYTHONUNBUFFERED": "1", ERROR_DIR_ENV: errors,
                       LAUNCHER_ENV: str(os.getpid()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    torchrun = parse_args([f"--nproc-per-node={nproc}", f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
                           *rendezvous, "--max-restarts=0", "--monitor-interval=0.1", "-m", module, command,
                           *argv])
    config, cmd, cmd_args = config_from_args(torchrun)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    outcome: dict = {}

    def agent() -> None:
        try:
            elastic_launch(config, cmd)(*cmd_args)
        except ChildFailedError as err:
            outcome["failures"] = err.failures
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = err

    _Supervisor(command).install()
    thread = threading.Thread(target=agent, name="vitscale-agent", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    # the job is over: a late stop request (SLURM repeats SIGTERM) has nothing left to stop. Ignore
    # it, or Python's finalization, which resets signals that have Python handlers to the default
    # action, would let it kill this process on its way out (status 143 for a job that ended well)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        if "error" in outcome:
            raise outcome["error"]
        return _report(command, outcome.get("failures"), Path(errors))
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _report(command: str, failures: dict | None, errors: Path) -> int:
    """Print the root cause of a failed job once; return the exit status."""
    if not failures:
        return 0
    texts = {f.name: f.read_text() for f in sorted(errors.glob("*.txt"))}
    user = list(dict.fromkeys(t for name, t in texts.items() if name.startswith("user-")))
    if user:
        for text in user:
            print(f"vitscale {command}: error: {text}", file=sys.stderr)
        return 2
    # the agent stops the other ranks with SIGTERM after the first failure: that one is the cause
    died = sorted(((f.exitcode == -signal.SIGTERM, f.timestamp, rank), f) for rank, f in failures.items()
                  if f.exitcode != 2)
    if died:
        (*_, rank), f = died[0]
        how = (f"was killed by {f.signal_name()}" if f.exitcode < 0 else
               f"exited with status {f.exitcode} (its traceback is above)")
        print(f"vitscale {command}: rank {rank} {how}; the job stopped. The checkpoints are intact and "
              f"relaunching the same command resumes from the latest", file=sys.stderr)
        return 1
    peer = list(dict.fromkeys(t for name, t in texts.items() if name.startswith("peer-")))
    print(f"vitscale {command}: error: {peer[0] if peer else 'a rank stopped with a user error'}", file=sys.stderr)
    return 2
