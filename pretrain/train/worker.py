"""One rank's process: signals, the process group, and how it ends.

``run_worker`` is what a rank of ``vitscale pretrain`` / ``finetune`` runs: it installs the stop
flag first (a preemption signal during start-up is acted on at the next step boundary, never
fatal), joins the process group, runs the :class:`~pretrain.train.trainer.Trainer`, and leaves
the group in step with the other ranks. A collective that fails because another rank died or hung
becomes :class:`PeerFailure`, a user error the launcher reports after the root cause.
"""

from __future__ import annotations

import faulthandler
import os
import signal

import torch

from pretrain.core.errors import UserError
from pretrain.train.config import Config
from pretrain.train.engine import Comm, destroy, init_distributed
from pretrain.train.quiet import quiet_third_party


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption; the ``vitscale`` launcher forwards both as
    SIGUSR1); ranks agree on it at step boundaries. Installed first thing, so a signal during
    start-up, resume or a save is never fatal: it is acted on at the next step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID`: where is a rank stuck?

    def _handle(self, signum, frame) -> None:
        self.raised = True


def run_worker(cfg: Config, mode: str, resume: str | None, no_resume: bool, prepare_model=None,
               recipe: str | None = None) -> int:
    """One rank of the job. Returns 0 when the run finished or was preempted (saved); the rank
    then leaves the process group in step with the others (see :func:`leave_job`). ``recipe``:
    what ``--config`` named, recorded in the run's start record."""
    stop = StopFlag()
    quiet_third_party(int(os.environ.get("RANK", "0")))
    rank, world, _ = init_distributed(cfg.run.timeout_s)
    try:
        from pretrain.train.trainer import Trainer

        code = Trainer(cfg, mode, rank, world, stop, prepare_model, recipe).run(resume, no_resume)
        leave_job()
        return code
    except torch.distributed.DistError as err:
        raise PeerFailure(rank, cfg.run.timeout_s, err) from err
    except RuntimeError as err:
        if not _is_peer_failure(err):
            raise
        raise PeerFailure(rank, cfg.run.timeout_s, err) from err


def leave_job() -> None:
    """Wait for every rank, then destroy the process group before the interpreter exits: a gloo
    group torn down by static destructors at exit, with its transport threads still running,
    aborts the process ("terminate called without an active exception") after a finished run."""
    Comm.barrier()
    destroy()


class PeerFailure(UserError):
    """A collective failed: another rank died or stopped answering within ``run.timeout_s``."""

    secondary = True  # a consequence: the launcher reports the root cause first

    def __init__(self, rank: int, timeout_s: int, err: Exception):
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        super().__init__(f"rank {rank}: a collective operation failed, so another process of the job died or "
                         f"did not answer within run.timeout_s={timeout_s} s ({first}). The job stops; the "
                         f"checkpoints are intact and relaunching the same command resumes from the latest")


def _is_peer_failure(err: RuntimeError) -> bool:
    """gloo reports a dead or silent peer as a plain RuntimeError from its transport."""
    text = str(err)
    return "gloo/transport" in text or any(s in text for s in ("Connection closed by peer", "Connection reset by "
                                                                "peer", "Timed out waiting", "Broken pipe"))
