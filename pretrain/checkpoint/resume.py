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
  state, the EMA and the RNG states of every rank. Every random draw of a step (the model's
  dropout, attention dropout, drop path and patch dropout, Mixup / CutMix, each sample's crop,
  flip and RandAugment) is seeded by (seed, step, micro batch of the global batch) or (seed,
  epoch, sample key), never by a rank, a worker or a generator's history, so nothing that runs
  between steps (a loader starting, an evaluation, a background save) can shift it. With the
  same config the resumed run is the uninterrupted run:
  on CPU with ``run.deterministic=true`` the losses and the EMA are bitwise equal step for step
  and every rank sees the same sample keys (tested under ZeRO-1/2/3, ``tests/test_exact_resume.py``);
  on GPU up to kernel nondeterminism. A checkpoint that lacks a component of the run (loop,
  data, rng, ema) is refused unless the component has a default (EMA: the restored weights; RNG:
  re-seeded), which is printed.
- Another world size (N -> M processes, any ZeRO stage): rank 0 converts the checkpoint once
  into ``checkpoints/universal/<tag>`` (DeepSpeed's universal format; the other ranks wait, at
  most ``run.timeout_s``) and every rank loads it: fp32 master weights, Adam moments and step,
  the step, loop counters. The synthetic source counts samples over all ranks, so it continues
  with exactly the next unseen sample; the shard loader's global sample stream does not depend
  on the world size (:mod:`pretrain.data.stream`): with the same ``train.global_batch`` every
  step holds the same samples as it would have on the old world size, nothing repeated or
  skipped, and with the same ``train.micro_batch`` the same micro batches with the same Mixup /
  CutMix and dropout draws, so the losses agree up to floating-point reduction order. The
  global RNG streams are re-seeded from (seed, rank, step). With ``train.global_batch`` set (and
  ``train.grad_accum`` left to be derived) the global batch stays the same; otherwise a changed
  global batch is listed in the warning.

This module knows checkpoints, not run configs: the run describes itself with an ``identity``
dict (:func:`pretrain.train.config.identity`: model spec, ZeRO stage, optimizer, mode, resolved
config), and restoring the state into the engine and the components is the trainer's job.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from pretrain.checkpoint.layout import (
    UNIVERSAL_FORMAT,
    CheckpointManager,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from pretrain.checkpoint.universal import universal_for
from pretrain.core.errors import UserError
from pretrain.model.vit import ViTSpec

_UNWATCHED = {"run.dir", "run.timeout_s", "train.grad_accum", "train.log_every", "train.eval_every",
              "train.eval_batches", "data.workers", "data.val", "data.val_samples"}
_WATCHED = ("train", "optim", "data", "run")


@dataclass
class ResumeSource:
    tag_dir: Path
    meta: dict
    universal: Path | None = None  # set when the checkpoint was written by another world size

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def find_resume_source(ckpt: CheckpointManager, resume: str | None, no_resume: bool, identity: dict, world: int,
                       log) -> ResumeSource | None:
    """The checkpoint to continue from (see the module docstring), checked against the run's
    ``identity``; converted to a universal checkpoint when the world size differs. None: a fresh
    start. ``log`` has ``console(text)`` and ``write(record)``."""
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
            if any("is not usable" in w for w in warnings):
                raise UserError("no usable checkpoint to resume from: " + "; ".join(warnings) + ". Start a new "
                                "run.dir, or pass --resume with a checkpoint from elsewhere")
            return None
    meta = read_meta(tag_dir)
    check_compatible(meta, identity, tag_dir)
    changes = config_changes(meta, identity, world)
    if changes:
        log.console("warning: the config differs from the checkpoint's: " + "; ".join(changes))
        log.write({"kind": "event", "event": "config_changed", "changes": changes})
    source = ResumeSource(tag_dir, meta)
    if meta.get("world_size") != world:
        log.console(f"{tag_dir.name} was written by {meta.get('world_size')} processes, this job has {world}: "
                    f"resuming through a DeepSpeed universal checkpoint")
        source.universal = universal_for(ckpt, tag_dir)
    return source


def check_before_launch(run_dir: Path, keep: int, identity: dict, resume: str | None, no_resume: bool,
                        hash_files: bool) -> None:
    """The resume mistakes a user can make, caught in the launching process before any rank
    starts (exit 2 at once): ``--no-resume`` over existing checkpoints, a ``--resume`` checkpoint
    that is missing, damaged (sizes; and sha256 when ``hash_files``) or does not fit the run,
    and a newest usable checkpoint that does not fit the run. The ranks check again (and more:
    auto-resume verifies every file and falls back to older checkpoints)."""
    ckpt = CheckpointManager(Path(run_dir), 0, 1, keep, comm=None)
    if resume:
        tag_dir = resolve_checkpoint(resume)
        _refuse_universal(tag_dir, resume)
        problems = verify_checkpoint(tag_dir, None if hash_files else [])
        _refuse_damaged(resume, problems)
    elif no_resume:
        _refuse_existing(ckpt)
        return
    else:
        tag_dir = next((t for t in ckpt.candidates() if read_meta(t) is not None), None)
        if tag_dir is None:
            return
    meta = read_meta(tag_dir)
    if meta is not None:
        check_compatible(meta, identity, tag_dir)


def _refuse_universal(tag_dir: Path, given: str) -> None:
    meta = read_meta(tag_dir) or {}
    if meta.get("format") == UNIVERSAL_FORMAT:
        src = meta.get("universal_from", "step_...")
        raise UserError(f"--resume {given} is a universal checkpoint; pass the training checkpoint it was "
                        f"converted from ({src}) instead: a resume with another process count converts it "
                        f"by itself and also restores the loader state")


def check_compatible(meta: dict, identity: dict, tag_dir: Path) -> None:
    """Refuse a checkpoint that cannot be loaded into this run without silent changes."""
    defaults = {f.name: f.default for f in fields(ViTSpec) if f.default is not MISSING}
    spec, saved = identity["model_spec"], {**defaults, **meta.get("model_spec", {})}  # older files lack norm_eps
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in spec.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {tag_dir} does not match the config's model ({'; '.join(diff)}): use "
                        f"the config the run was started with, or a new run.dir")
    if meta.get("zero_stage") != identity["zero_stage"]:
        raise UserError(f"checkpoint {tag_dir} was written with ZeRO stage {meta.get('zero_stage')} but the "
                        f"config says zero.stage={identity['zero_stage']}: set zero.stage={meta.get('zero_stage')}")
    saved_optim = meta.get("optimizer") or meta.get("config", {}).get("optim", {}).get("name", identity["optimizer"])
    if saved_optim != identity["optimizer"]:
        raise UserError(f"checkpoint {tag_dir} holds {saved_optim} optimizer state but the config says "
                        f"optim.name={identity['optimizer']}: set optim.name={saved_optim}, or start a new run.dir")
    mode = identity["mode"]
    if meta.get("mode", mode) != mode:
        raise UserError(f"checkpoint {tag_dir} comes from a {meta.get('mode')} run and cannot continue as "
                        f"{mode}: to fine-tune from it set finetune.init={tag_dir} in a new run.dir")


def config_changes(meta: dict, identity: dict, world: int) -> list[str]:
    """Settings that differ between the checkpoint's run and this one (allowed, but listed)."""
    saved, now = meta.get("config", {}), identity["config"]
    changed = [f"{sec}.{k}: {saved[sec][k]!r} -> {v!r}" for sec in _WATCHED for k, v in now.get(sec, {}).items()
               if sec in saved and k in saved[sec] and saved[sec][k] != v and f"{sec}.{k}" not in _UNWATCHED]
    t, n = saved.get("train", {}), now["train"]
    if t.get("micro_batch") and t.get("grad_accum") and "world_size" in meta:
        before = t["micro_batch"] * t["grad_accum"] * meta["world_size"]
        after = n["micro_batch"] * n["grad_accum"] * world
        if before != after:
            changed.append(f"global batch: {before} -> {after} (micro batch x grad accum x processes; set "
                           f"train.global_batch={before} to keep it)")
    return changed


def _refuse_damaged(resume: str, problems: list[str]) -> None:
    if problems:
        raise UserError(f"--resume {resume}: the checkpoint is damaged: " + "; ".join(problems) +
                        ". Pass an older checkpoint (a tag directory under checkpoints/) instead")


def _refuse_existing(ckpt: CheckpointManager) -> None:
    if ckpt.has_checkpoints():
        raise UserError(f"--no-resume but {ckpt.dir} already holds checkpoints: choose a new run.dir "
                        f"or drop --no-resume to continue that run")
