"""What one rank runs: set up, resume, train, evaluate, checkpoint, summarise.

Shared by ``vitscale pretrain`` and ``vitscale finetune`` (which passes a ``prepare_model``
hook that performs the head / position-embedding surgery before the engine is built).

Order matters: the checkpoint to resume from is chosen and checked (and, for another world
size, converted to a universal checkpoint) before the DeepSpeed engine is built, because
DeepSpeed must know at ``initialize`` whether it will load a universal checkpoint.

Preemption: SIGTERM or SIGUSR1 on any rank sets a flag; after every step the ranks all-reduce
it, so all of them stop after the same step, save it (complete and atomic, see
:mod:`pretrain.checkpoint.layout`) and return 0. A signal during a save lets the save finish; the stop
then happens after the next step. The grace period a cluster gives must cover one step plus
one save. Faults for tests come from ``VITSCALE_FAULT`` (:mod:`pretrain.train.faults`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint.layout import CheckpointManager
from pretrain.checkpoint.resume import find_resume_source, restore
from pretrain.core.errors import UserError
from pretrain.data.pipeline import build_eval_data, build_train_data
from pretrain.model.costs import model_costs
from pretrain.model.vit import build_model
from pretrain.train.config import Config, save_config
from pretrain.train.engine import Comm, Engine, all_reduce_, init_distributed
from pretrain.train.faults import Faults
from pretrain.train.loop import LoopState, SampleKeysLog, evaluate, fit
from pretrain.train.metrics import MetricsLog, device_peak_flops


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption; the ``vitscale`` spawner forwards both as
    SIGUSR1); ranks agree on it at step boundaries. Installed first thing, so a signal during
    start-up, resume or a save is never fatal: it is acted on at the next step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID`: where is a rank stuck?

    def _handle(self, signum, frame) -> None:
        self.raised = True


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (GPU)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # filling every new tensor with NaN is a debugging aid, not needed for reproducibility,
        # and costs a lot with DeepSpeed's large communication buckets
        torch.utils.deterministic.fill_uninitialized_memory = False


def run_worker(cfg: Config, mode: str, resume: str | None, no_resume: bool, prepare_model=None) -> int:
    """One rank of the job. Returns 0 when the run finished or was preempted (saved)."""
    stop = StopFlag()
    rank, world, _ = init_distributed(cfg.run.timeout_s)
    try:
        return _run(cfg, mode, resume, no_resume, prepare_model, stop, rank, world)
    except torch.distributed.DistError as err:
        raise PeerFailure(rank, cfg.run.timeout_s, err) from err
    except RuntimeError as err:
        if not _is_peer_failure(err):
            raise
        raise PeerFailure(rank, cfg.run.timeout_s, err) from err


class PeerFailure(UserError):
    """A collective failed: another rank died or stopped answering within ``run.timeout_s``."""

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


def _run(cfg: Config, mode: str, resume: str | None, no_resume: bool, prepare_model, stop: StopFlag,
         rank: int, world: int) -> int:
    cfg.train.check_world(world)
    run_dir = Path(cfg.run.dir)
    log = MetricsLog(run_dir, rank, cfg.log.tensorboard)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    faults = Faults(os.environ.get("VITSCALE_FAULT"), rank)
    comm = Comm()
    ckpt = CheckpointManager(run_dir, rank, world, cfg.checkpoint.keep, comm)
    source = find_resume_source(cfg, ckpt, resume, no_resume, log, world, mode)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    spec = cfg.model.spec()
    model = build_model(spec)
    if prepare_model is not None:
        prepare_model(model, log)
    if cfg.model.compile:
        model.compile_blocks()
    costs = model_costs(spec)
    engine = Engine(model, cfg, world, load_universal=source is not None and source.universal is not None)
    torch.manual_seed(cfg.run.seed + 1000 * (rank + 1))  # per-rank stream (dropout, augmentation)
    train_data = build_train_data(cfg, rank, world)
    state = LoopState()
    start = restore(source, engine, ckpt, train_data, state, cfg, rank, log) if source is not None else 0
    ckpt_meta = {"format": "vitscale-deepspeed", "model_spec": spec.to_dict(), "world_size": world,
                 "zero_stage": cfg.zero.stage, "config": cfg.to_dict(), "mode": mode}

    def save(step: int) -> None:
        if not _weights_finite(engine):
            raise UserError(f"step {step}: the weights hold NaN/Inf; no checkpoint is written. Resume "
                            f"from the previous checkpoint with a lower optim.lr")
        path = ckpt.save(engine, step, ckpt_meta, {"data": train_data.state_dict(), "loop": vars(state)},
                         before_publish=faults.save_pause(step))
        log.write({"kind": "event", "step": step, "event": "checkpoint", "path": str(path)})

    def agree_to_stop() -> bool:
        flags = torch.tensor([1.0 if stop.raised else 0.0, 1.0 if train_data.problem() else 0.0],
                             device=engine.device)
        flags = all_reduce_(flags, "max").tolist()
        if flags[1] > 0:
            raise UserError(train_data.problem() or "another rank stopped on bad training data (see its "
                            "message above)")
        return flags[0] > 0

    preempted = False

    def on_step(st: LoopState) -> bool:
        nonlocal preempted
        if faults.stop(st.step):
            stop.raised = True
        if agree_to_stop():
            log.console(f"stop signal received: saving at step {st.step} and exiting")
            save(st.step)
            log.write({"kind": "event", "step": st.step, "event": "preempted"})
            preempted = True
            return True
        every = cfg.checkpoint.every
        if every and st.step % every == 0 and st.step != cfg.train.steps:
            save(st.step)
        return False

    def eval_fn() -> dict:
        batches = build_eval_data(cfg, rank, world)
        return evaluate(engine, batches, cfg) if batches is not None else {}

    if agree_to_stop():  # signalled during start-up: nothing new to save
        log.console(f"stop signal received before step {start + 1}: exiting (the checkpoint of step {start} "
                    f"stays the latest)")
        log.write({"kind": "event", "step": start, "event": "preempted"})
        train_data.close()
        return 0
    peak = device_peak_flops(cfg.log.peak_flops)
    procs = f"{world} process{'es' if world > 1 else ''}"
    log.console(f"{mode}: {cfg.model.name} {costs['params'] / 1e6:.2f}M params, {procs}, ZeRO-"
                f"{cfg.zero.stage}, {'bf16' if cfg.train.bf16 else 'fp32'}, steps {start + 1}..{cfg.train.steps}, "
                f"run dir {run_dir}")
    t0 = time.perf_counter()
    fit(engine, train_data, eval_fn if cfg.data.val else None, cfg, state, log,
        costs["train_tflops_per_image"] * 1e12, peak, world, on_step, faults.loss_fault,
        SampleKeysLog(run_dir, rank) if cfg.log.sample_keys else None)
    if preempted:
        train_data.close()
        log.close()
        return 0
    if cfg.data.val:
        state.last_eval = {"kind": "eval", "step": state.step, **eval_fn()}
        log.write(state.last_eval)
    if start < cfg.train.steps:
        save(state.step)
    _summary(cfg, state, log, run_dir, time.perf_counter() - t0, mode)
    train_data.close()
    log.close()
    return 0


def _weights_finite(engine: Engine) -> bool:
    ok = all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
             for p in engine.module.parameters())
    return all_reduce_(torch.tensor([0.0 if ok else 1.0], device=engine.device), "max").item() == 0


def _summary(cfg, state: LoopState, log: MetricsLog, run_dir: Path, seconds: float, mode: str) -> None:
    if log.rank != 0:
        return
    ev = state.last_eval
    summary = {"mode": mode, "steps": state.step, "first_loss": state.first_loss, "final_loss": state.last_loss,
               "eval_top1": ev.get("top1"), "eval_top5": ev.get("top5"), "eval_prec1": ev.get("prec1"),
               "images_per_s": state.images_per_s, "bad_steps_total": state.bad_steps_total,
               "seconds": round(seconds, 1), "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    acc = ev.get("top1", ev.get("prec1"))
    print("\n".join([
        f"== {mode} done ==",
        f"steps          {state.step}",
        f"loss           {_fmt(state.first_loss)} (first) -> {_fmt(state.last_loss)} (final)",
        f"eval top-1     {'n/a' if acc is None else f'{100 * acc:.1f}%'}",
        f"images/s       {_fmt(state.images_per_s, '.1f')}",
        f"run directory  {run_dir}",
    ]), flush=True)
    sys.stdout.flush()


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)
