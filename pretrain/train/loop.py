"""The pieces of one training step and of an evaluation pass, shared by pretraining and fine-tuning
(the loop around them is :class:`pretrain.train.trainer.Trainer`).

A step consumes ``train.grad_accum`` micro batches per rank and applies one optimizer step;
the LR comes from :func:`pretrain.train.schedule.lr_at`. Losses stay on the device between log
steps; a step has one all-reduce and one host sync of ours (the non-finite verdict together with
the stop and bad-data flags), so all ranks skip or stop at the same step.

Non-finite values: a NaN/Inf loss on any rank, or a finite loss with a NaN/Inf gradient norm
(DeepSpeed skips that update on every rank: ZeRO-1/2 through ``bf16.check_grad_overflow``, on
by default, ZeRO-3 through its global grad norm; checked for DeepSpeed 0.19), skips the step:
the weights do not move, the step counter and the data advance, a ``nonfinite_*_skipped`` event
is logged and ``bad_steps_total`` counts it. ``train.max_bad_steps`` skipped steps in a row stop
the run with a message. The trainer refuses to save weights that are not finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.core.seeds import derive_seed
from pretrain.data.batch import Batch
from pretrain.model.vit import seeded_noise
from pretrain.train.config import Config
from pretrain.train.engine import Engine, all_reduce_
from pretrain.train.losses import classification_loss, correct_counts
from pretrain.train.mixing import Mixer


def _targets(batch: Batch, cfg: Config, num_classes: int) -> torch.Tensor:
    t = batch.targets
    if cfg.train.loss == "sigmoid" and t.dim() == 1:
        return torch.nn.functional.one_hot(t, num_classes).float()
    return t


@torch.no_grad()
def evaluate(engine: Engine, batches, cfg: Config) -> dict:
    """Top-1/top-5 (single-label) or precision@1 (multi-label) over all ranks' batches."""
    engine.train(False)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        logits = engine.forward(batch.images).float().cpu()
        valid = batch.valid if batch.valid is not None else torch.ones(len(logits), dtype=torch.bool)
        logits, targets = logits[valid], batch.targets[valid]
        if len(logits) == 0:
            continue
        loss_sum += classification_loss(logits, targets, cfg.train.loss).double() * len(logits)
        for key, val in correct_counts(logits, targets).items():
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + val.double()
        count += len(logits)
    keys = ["top1", "top5"] if not cfg.data.multi_label else ["prec1"]
    vec = torch.stack([count, loss_sum] + [sums.get(k, torch.zeros((), dtype=torch.float64)) for k in keys])
    vec = all_reduce_(vec.to(engine.device)).cpu()
    engine.train(True)
    n = max(vec[0].item(), 1.0)
    out = {"eval_samples": int(vec[0].item()), "eval_loss": vec[1].item() / n}
    out.update({k: vec[2 + i].item() / n for i, k in enumerate(keys)})
    return out


@dataclass
class StepOutcome:
    loss: torch.Tensor  # mean loss over the micro batches (on the device)
    applied: bool  # the optimizer step changed the weights
    skip_reason: str | None = None  # "nonfinite_loss" or "nonfinite_grad" when not applied
    flags: tuple[float, ...] = ()  # the caller's flags, maxed over all ranks


def run_step(engine: Engine, micro_batches: list[Batch], cfg: Config, num_classes: int,
             lr: float, fault=None, mixer: Mixer | None = None, step: int = 0, rank: int = 0,
             flags: tuple[float, ...] = ()) -> StepOutcome:
    """Forward/backward over the micro batches and one optimizer step, with one host sync.

    Images cross to the device and are normalised there; ``mixer`` (Mixup / CutMix) then mixes
    micro batch ``i`` as a pure function of (seed, ``step``, ``m``), where ``m = rank x A + i`` is
    the micro batch's place in the global batch (``A`` micro batches per rank: the canonical micro
    batch of :mod:`pretrain.data.stream`, the same images on any world size), and the model's own
    noise (dropout, attention dropout, drop path, patch dropout) is drawn inside
    :func:`~pretrain.model.vit.seeded_noise` with a seed derived from the same three: a resumed run,
    also on another world size with the same micro batch, draws exactly what the uninterrupted one
    drew, whatever else used torch's global generator in between (a DataLoader starting draws its
    base seed from it). A micro batch whose
    loss is not finite contributes an exact zero (its gradients stay finite). Before the optimizer
    step one all-reduce agrees, over all ranks, on whether any rank saw such a loss and on the
    caller's ``flags`` (stop request, bad data; returned maxed in ``flags``), and one host sync
    reads the result: if any loss was not finite the step runs with lr 0, so the weights do not
    move on any rank. A finite loss whose gradients are not finite is caught by DeepSpeed, which
    skips the update on every rank (see :meth:`Engine.step_applied`); the step then counts as
    skipped too. Every rank issues the same collectives and reaches the same verdict.
    """
    losses = []
    bad = torch.zeros((), device=engine.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        m = rank * len(micro_batches) + i  # the canonical micro batch
        images = engine.to_device(batch.images)
        targets = _targets(batch, cfg, num_classes).to(images.device)
        if mixer is not None:
            images, targets = mixer(images, targets, step, m)
        with seeded_noise(derive_seed("noise", cfg.run.seed, step, m), images.device):
            logits = engine.model_forward(images)
        loss = classification_loss(logits, targets, cfg.train.loss, cfg.train.label_smoothing)
        if fault is not None:
            loss = fault(loss)
        losses.append(loss.detach())
        nonfinite = ~torch.isfinite(loss.detach())
        bad = torch.maximum(bad, nonfinite.float())
        engine.backward(torch.where(nonfinite, loss.nan_to_num(0.0, 0.0, 0.0) * 0.0, loss))
        if i == last:
            agreed = all_reduce_(torch.stack([bad, *(torch.tensor(float(f), device=bad.device) for f in flags)]),
                                 "max").tolist()  # the step's one host sync
            if agreed[0] > 0:
                engine.set_lr(0.0)
        engine.step()
    mean = torch.stack(losses).mean()
    if agreed[0] > 0:
        engine.set_lr(lr)
        return StepOutcome(mean, False, "nonfinite_loss", tuple(agreed[1:]))
    if not engine.step_applied():
        return StepOutcome(mean, False, "nonfinite_grad", tuple(agreed[1:]))
    return StepOutcome(mean, True, None, tuple(agreed[1:]))


def train_step(engine: Engine, micro_batches: list[Batch], cfg: Config, num_classes: int,
               lr: float, fault=None) -> tuple[torch.Tensor, bool]:
    """:func:`run_step` as (mean loss, whether the update was applied)."""
    out = run_step(engine, micro_batches, cfg, num_classes, lr, fault)
    return out.loss, out.applied


class SampleKeysLog:
    """Debug record (``log.sample_keys``): each rank appends ``{"step", "keys"}`` per step to
    ``run.dir/sample_keys_rank{r}.jsonl``; a resumed run appends to the same file."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / f"sample_keys_rank{rank}.jsonl"

    def __call__(self, step: int, batches: list[Batch]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": [k for b in batches for k in b.keys]}) + "\n")


def eval_line(rec: dict) -> str:
    parts = [f"{k} {100 * rec[k]:.2f}%" for k in ("top1", "top5", "prec1", "ema_top1", "ema_top5", "ema_prec1")
             if k in rec]
    return f"eval @ step {rec['step']}: loss {rec['eval_loss']:.4f}  " + "  ".join(parts) + \
        f"  ({rec['eval_samples']} images)"
