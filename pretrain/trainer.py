"""What one rank runs: set up, resume, train, evaluate, checkpoint, summarise.

Shared by ``vitscale pretrain`` and ``vitscale finetune`` (which passes a ``prepare_model``
hook that performs the head / position-embedding surgery before the engine is built).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint import CheckpointManager, read_meta, resolve_checkpoint, set_rng_state
from pretrain.config import Config, save_config
from pretrain.costs import model_costs
from pretrain.data import build_eval_data, build_train_data
from pretrain.engine import Comm, Engine, all_reduce_, init_distributed
from pretrain.errors import UserError
from pretrain.loop import LoopState, evaluate, fit
from pretrain.metrics import MetricsLog, device_peak_flops
from pretrain.model import build_model


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption); ranks agree on it at step boundaries."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _fault_injector(spec: str | None, rank: int):
    """``VITSCALE_FAULT=nan@5,6:rank1`` makes the loss NaN at steps 5 and 6 on rank 1 (tests)."""
    if not spec:
        return lambda step: None
    kind, _, rest = spec.partition("@")
    steps_txt, _, where = rest.partition(":")
    steps = {int(s) for s in steps_txt.split(",") if s}
    only = int(where.removeprefix("rank")) if where else None
    if kind != "nan":
        raise ValueError(f"unknown fault {kind!r}")

    def fault_for(step: int):
        if step in steps and (only is None or only == rank):
            return lambda loss: loss * float("nan")
        return None

    return fault_for


def run_worker(cfg: Config, mode: str, resume: str | None, no_resume: bool, prepare_model=None) -> int:
    rank, world, _ = init_distributed()
    cfg.train.check_world(world)
    run_dir = Path(cfg.run.dir)
    log = MetricsLog(run_dir, rank, cfg.log.tensorboard)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    spec = cfg.model.spec()
    model = build_model(spec)
    if prepare_model is not None:
        prepare_model(model, log)
    costs = model_costs(spec)
    engine = Engine(model, cfg, world)
    torch.manual_seed(cfg.run.seed + 1000 * (rank + 1))  # per-rank stream (dropout, augmentation)
    comm = Comm()
    ckpt = CheckpointManager(run_dir, rank, world, cfg.checkpoint.keep, comm)
    train_data = build_train_data(cfg, rank, world)
    state = LoopState()
    start = _resume(cfg, engine, ckpt, train_data, state, resume, no_resume, log, world)
    stop = StopFlag()
    ckpt_meta = {"format": "vitscale-deepspeed", "model_spec": spec.to_dict(), "world_size": world,
                 "zero_stage": cfg.zero.stage, "config": cfg.to_dict(), "mode": mode}

    def save(step: int) -> None:
        if not _weights_finite(engine):
            raise UserError(f"step {step}: the weights hold NaN/Inf; no checkpoint is written. Resume "
                            f"from the previous checkpoint with a lower optim.lr")
        path = ckpt.save(engine, step, ckpt_meta, {"data": train_data.state_dict(), "loop": vars(state)})
        log.write({"kind": "event", "step": step, "event": "checkpoint", "path": str(path)})

    def on_step(st: LoopState) -> bool:
        data_problem = train_data.problem()
        flags = torch.tensor([1.0 if stop.raised else 0.0, 1.0 if data_problem else 0.0], device=engine.device)
        flags = all_reduce_(flags, "max").tolist()
        if flags[1] > 0:
            raise UserError(data_problem or "another rank stopped on bad training data (see its message above)")
        if flags[0] > 0:
            log.console(f"stop signal received: saving at step {st.step} and exiting")
            save(st.step)
            log.write({"kind": "event", "step": st.step, "event": "preempted"})
            return True
        every = cfg.checkpoint.every
        if every and st.step % every == 0 and st.step != cfg.train.steps:
            save(st.step)
        return False

    def eval_fn() -> dict:
        batches = build_eval_data(cfg, rank, world)
        return evaluate(engine, batches, cfg) if batches is not None else {}

    peak = device_peak_flops(cfg.log.peak_flops)
    log.console(f"{mode}: {cfg.model.name} {costs['params'] / 1e6:.2f}M params, {world} ranks, ZeRO-"
                f"{cfg.zero.stage}, {'bf16' if cfg.train.bf16 else 'fp32'}, steps {start + 1}..{cfg.train.steps}, "
                f"run dir {run_dir}")
    t0 = time.perf_counter()
    fit(engine, train_data, eval_fn if cfg.data.val else None, cfg, state, log,
        costs["train_tflops_per_image"] * 1e12, peak, world, on_step,
        _fault_injector(os.environ.get("VITSCALE_FAULT"), rank))
    if state.step < cfg.train.steps:  # preempted: already saved
        train_data.close()
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


def _resume(cfg, engine, ckpt, train_data, state, resume, no_resume, log, world) -> int:
    """Load the checkpoint to continue from; returns its step (0 for a fresh start)."""
    if resume:
        tag_dir = resolve_checkpoint(resume)
        problems = ckpt.verify_shared(tag_dir)
        if problems:
            raise UserError(f"--resume {resume}: " + "; ".join(problems))
    elif no_resume:
        if ckpt.latest() is not None:
            raise UserError(f"--no-resume but {ckpt.dir} already holds checkpoints: choose a new run.dir "
                            f"or drop --no-resume to continue that run")
        return 0
    else:
        tag_dir, warnings = ckpt.usable_for_resume()
        for w in warnings:
            log.console(f"warning: {w}; falling back to an earlier checkpoint")
            log.write({"kind": "event", "event": "checkpoint_rejected", "reason": w})
        if tag_dir is None:
            if warnings:
                raise UserError("no usable checkpoint to resume from: " + "; ".join(warnings))
            return 0
    meta = read_meta(tag_dir)
    _check_compatible(meta, cfg, tag_dir, world)
    engine.load(tag_dir.parent, tag_dir.name)
    rank_state = ckpt.load_rank_state(tag_dir)
    if rank_state is not None:
        train_data.load_state_dict(rank_state["data"])
        for key, value in rank_state["loop"].items():
            setattr(state, key, value)
        set_rng_state(rank_state["rng"])
    state.step = int(meta["step"])
    log.console(f"resumed from {tag_dir} at step {state.step}")
    log.write({"kind": "event", "step": state.step, "event": "resumed", "path": str(tag_dir)})
    return state.step


def _check_compatible(meta: dict, cfg: Config, tag_dir: Path, world: int) -> None:
    spec = cfg.model.spec().to_dict()
    saved = meta.get("model_spec", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in spec.items()
            if k not in ("dropout", "attn_dropout", "act_ckpt") and saved.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {tag_dir} does not match the config's model ({'; '.join(diff)}): use "
                        f"the config the run was started with, or a new run.dir")
    if meta.get("zero_stage") != cfg.zero.stage:
        raise UserError(f"checkpoint {tag_dir} was written with ZeRO stage {meta.get('zero_stage')} but the "
                        f"config says zero.stage={cfg.zero.stage}: set zero.stage={meta.get('zero_stage')}")
    if meta.get("world_size") != world:
        raise UserError(f"checkpoint {tag_dir} was written by {meta.get('world_size')} processes and this "
                        f"job has {world}: convert it first with `vitscale convert {tag_dir} "
                        f"{tag_dir}-universal --to deepspeed-universal` and resume from that")


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
