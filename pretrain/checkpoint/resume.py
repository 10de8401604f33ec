"""Where a run continues from, decided before the engine exists, and how its state comes back.

Choice of checkpoint (every rank reaches the same one):

- ``--resume PATH`` (a run dir, its ``checkpoints/`` dir or a tag dir): that checkpoint; if it
  fails verification (a file missing, truncated, or failing its sha256) the run stops with a
  message naming the file (exit 2).
- ``--no-resume``: start fresh; refused (exit 2) if ``run.dir`` already holds checkpoints.
- neither: ``run.dir``'s ``latest``, or if that one does not verify the newest older one that
  does (each rejected one is named in a warning and a ``checkpoint_rejected`` event); a fresh
  start when there is none.

A checkpoint whose model dimensions, ZeRO stage, optimizer or mode (pretrain / finetune) differ
from the config is refused with a message (exit 2), never partly loaded. Other config changes
(steps, LR, batch, seed, data) are allowed and listed in a warning.

What a resume restores, and what is guaranteed:

- Same world size: model and optimizer state (fp32 master weights, Adam moments and step), the
  step (the LR schedule is a pure function of it), the loop counters (bad steps), the loader
  state and the RNG states of every rank. With the same config the resumed run is the
  uninterrupted run: on CPU with ``run.deterministic=true`` the losses are bitwise equal step for
  step and every rank sees the same sample keys (tested); on GPU up to kernel nondeterminism.
- Another world size (N -> M processes, any ZeRO stage): rank 0 converts the checkpoint once
  into ``checkpoints/universal/<tag>`` (DeepSpeed's universal format; the other ranks wait, at
  most ``run.timeout_s``) and every rank loads it: fp32 master weights, Adam moments and step,
  the step, loop counters. The loader state comes from rank 0's file. The synthetic source
  counts samples over all ranks, so it continues with exactly the next unseen sample; the shard
  loader resumes at the same number of samples into its epoch (see
  :mod:`pretrain.data.loader`: nothing repeated or skipped beyond the batches in flight, but
  the rest of that epoch is filled from the new shard layout). RNG streams (dropout) are
  re-seeded from (seed, rank, step). The loss continues on course but not bitwise. World size
  changes the global batch unless ``train.grad_accum`` changes with it: going 2 -> 1 processes
  with ``train.global_batch`` fixed, pass ``train.grad_accum=<2x the old value>`` (the run
  refuses a contradicting ``train.global_batch`` before starting).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pretrain.checkpoint.layout import (
    CheckpointManager,
    read_meta,
    resolve_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from pretrain.core.errors import UserError
from pretrain.train.config import Config

if TYPE_CHECKING:  # the launching process imports this module without DeepSpeed
    from pretrain.train.loop import LoopState
    from pretrain.train.metrics import MetricsLog

_SPEC_IGNORED = ("dropout", "attn_dropout", "act_ckpt")
_WATCHED = ("train", "optim", "data", "run")
_UNWATCHED = {"run.dir", "run.timeout_s", "train.log_every", "train.eval_every", "train.eval_batches",
              "data.workers", "data.val", "data.val_samples"}


@dataclass
class ResumeSource:
    tag_dir: Path
    meta: dict
    universal: Path | None = None  # set when the checkpoint was written by another world size

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def find_resume_source(cfg: Config, ckpt: CheckpointManager, resume: str | None, no_resume: bool,
                       log: MetricsLog, world: int, mode: str) -> ResumeSource | None:
    """The checkpoint to continue from (see the module docstring), checked against ``cfg``;
    converted to a universal checkpoint when the world size differs. None: a fresh start."""
    if resume:
        tag_dir = resolve_checkpoint(resume)
        _refuse_universal(tag_dir, resume)
        problems = ckpt.verify_shared(tag_dir)
        _refuse_damaged(resume, problems)
    elif no_resume:
        _refuse_existing(ckpt)
        return None
    else:
        tag_dir, warnings = ckpt.usable_for_resume()
        for w in warnings:
            log.console(f"warning: {w}; falling back to an earlier checkpoint")
            log.write({"kind": "event", "event": "checkpoint_rejected", "reason": w})
        if tag_dir is None:
            if warnings:
                raise UserError("no usable checkpoint to resume from: " + "; ".join(warnings) + ". Start a new "
                                "run.dir, or pass --resume with a checkpoint from elsewhere")
            return None
    meta = read_meta(tag_dir)
    check_compatible(meta, cfg, tag_dir, mode)
    _warn_changes(meta, cfg, world, log)
    source = ResumeSource(tag_dir, meta)
    if meta.get("world_size") != world:
        log.console(f"{tag_dir.name} was written by {meta.get('world_size')} processes, this job has {world}: "
                    f"resuming through a DeepSpeed universal checkpoint")
        source.universal = ckpt.universal_for(tag_dir)
    return source


def check_before_launch(cfg: Config, mode: str, resume: str | None, no_resume: bool, hash_files: bool) -> None:
    """The resume mistakes a user can make, caught in the launching process before any rank
    starts (exit 2 at once): ``--no-resume`` over existing checkpoints, a ``--resume`` checkpoint
    that is missing, damaged (sizes; and sha256 when ``hash_files``) or does not fit the config,
    and a ``latest`` checkpoint that does not fit the config. The ranks check again (and more:
    auto-resume verifies every file and falls back to older checkpoints)."""
    ckpt = CheckpointManager(Path(cfg.run.dir), 0, 1, cfg.checkpoint.keep, comm=None)
    if resume:
        tag_dir = resolve_checkpoint(resume)
        _refuse_universal(tag_dir, resume)
        problems = verify_checkpoint(tag_dir, None if hash_files else [])
        _refuse_damaged(resume, problems)
    elif no_resume:
        _refuse_existing(ckpt)
        return
    else:
        tag_dir = ckpt.latest()
        if tag_dir is None:
            return
    meta = read_meta(tag_dir)
    if meta is not None:
        check_compatible(meta, cfg, tag_dir, mode)


def _refuse_universal(tag_dir: Path, given: str) -> None:
    meta = read_meta(tag_dir) or {}
    if meta.get("format") == "vitscale-deepspeed-universal":
        src = meta.get("universal_from", "step_...")
        raise UserError(f"--resume {given} is a universal checkpoint; pass the training checkpoint it was "
                        f"converted from ({src}) instead: a resume with another process count converts it "
                        f"by itself and also restores the loader state")


def check_compatible(meta: dict, cfg: Config, tag_dir: Path, mode: str) -> None:
    """Refuse a checkpoint that cannot be loaded into this config without silent changes."""
    spec = cfg.model.spec().to_dict()
    saved = meta.get("model_spec", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in spec.items()
            if k not in _SPEC_IGNORED and saved.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {tag_dir} does not match the config's model ({'; '.join(diff)}): use "
                        f"the config the run was started with, or a new run.dir")
    if meta.get("zero_stage") != cfg.zero.stage:
        raise UserError(f"checkpoint {tag_dir} was written with ZeRO stage {meta.get('zero_stage')} but the "
                        f"config says zero.stage={cfg.zero.stage}: set zero.stage={meta.get('zero_stage')}")
    saved_optim = meta.get("config", {}).get("optim", {}).get("name", cfg.optim.name)
    if saved_optim != cfg.optim.name:
        raise UserError(f"checkpoint {tag_dir} holds {saved_optim} optimizer state but the config says "
                        f"optim.name={cfg.optim.name}: set optim.name={saved_optim}, or start a new run.dir")
    if meta.get("mode", mode) != mode:
        raise UserError(f"checkpoint {tag_dir} comes from a {meta.get('mode')} run and cannot continue as "
                        f"{mode}: to fine-tune from it set finetune.init={tag_dir} in a new run.dir")


def _warn_changes(meta: dict, cfg: Config, world: int, log: MetricsLog) -> None:
    saved, now = meta.get("config", {}), cfg.to_dict()
    changed = [f"{sec}.{k}: {saved[sec][k]!r} -> {v!r}" for sec in _WATCHED for k, v in now[sec].items()
               if sec in saved and k in saved[sec] and saved[sec][k] != v and f"{sec}.{k}" not in _UNWATCHED]
    t = saved.get("train", {})
    if "micro_batch" in t and "grad_accum" in t and "world_size" in meta:
        before = t["micro_batch"] * t["grad_accum"] * meta["world_size"]
        after = cfg.train.micro_batch * cfg.train.grad_accum * world
        if before != after:
            changed.append(f"global batch: {before} -> {after} (micro batch x grad accum x processes; keep it "
                           f"with train.grad_accum={before / (cfg.train.micro_batch * world):g} if whole)")
    if changed:
        log.console("warning: the config differs from the checkpoint's: " + "; ".join(changed))
        log.write({"kind": "event", "event": "config_changed", "changes": changed})


def restore(source: ResumeSource, engine, ckpt: CheckpointManager, train_data, state: LoopState,
            cfg: Config, rank: int, log: MetricsLog) -> int:
    """Load ``source`` into the engine, the loader, the loop state and the RNGs; returns its step."""
    if source.universal is not None:
        engine.load_universal(source.universal)
        rank_state = ckpt.load_rank_state(source.tag_dir, rank=0)
    else:
        engine.load(source.tag_dir.parent, source.tag_dir.name)
        rank_state = ckpt.load_rank_state(source.tag_dir)
    if rank_state is not None:
        train_data.load_state_dict(rank_state["data"])
        for key, value in rank_state["loop"].items():
            setattr(state, key, value)
        if source.universal is None:
            set_rng_state(rank_state["rng"])
    if source.universal is not None or rank_state is None:
        reseed_rank(cfg.run.seed, rank, source.step)
    if rank_state is None:
        log.console(f"warning: {source.tag_dir} holds no loader state (rank_*.pt): the data stream starts "
                    f"again from its beginning")
    state.step = source.step
    where = source.tag_dir if source.universal is None else f"{source.tag_dir} (via {source.universal})"
    log.console(f"resumed from {where} at step {state.step}")
    log.write({"kind": "event", "step": state.step, "event": "resumed", "path": str(source.tag_dir),
               "universal": source.universal is not None})
    return state.step


def reseed_rank(seed: int, rank: int, step: int) -> None:
    """Per-rank RNG streams as a pure function of (seed, rank, step)."""
    s = seed + 1000 * (rank + 1) + 1_000_003 * step
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _refuse_damaged(resume: str, problems: list[str]) -> None:
    if problems:
        raise UserError(f"--resume {resume}: the checkpoint is damaged: " + "; ".join(problems) +
                        ". Pass an older checkpoint (a tag directory under checkpoints/) instead")


def _refuse_existing(ckpt: CheckpointManager) -> None:
    if ckpt.has_checkpoints():
        raise UserError(f"--no-resume but {ckpt.dir} already holds checkpoints: choose a new run.dir "
                        f"or drop --no-resume to continue that run")
