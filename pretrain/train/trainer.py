"""What one rank runs: set up, resume, train, checkpoint, evaluate, summarise.

Shared by ``vitscale pretrain`` and ``vitscale finetune`` (which passes a ``prepare_model`` hook
that performs the head / position-embedding surgery before the engine is built).

The rank's state is the DeepSpeed engine (weights, optimizer) plus named components registered
in :class:`~pretrain.train.state.Components` (``loop`` counters, ``data`` position, ``rng``);
a checkpoint saves and restores all of them together, so a new piece of state is one
``components.register`` call.

Order matters:

- the checkpoint to resume from is chosen and checked (and, for another world size, converted to
  a universal checkpoint) before the DeepSpeed engine is built, because DeepSpeed must know at
  ``initialize`` whether it will load a universal checkpoint;
- after a step, a stop request is acted on first (save, exit), then a checkpoint that is due is
  written, and only then an evaluation runs: an evaluation that fails never costs the interval
  since the last checkpoint. At the end the final checkpoint is written before the final eval.

Preemption: SIGTERM or SIGUSR1 on any rank sets a flag (:class:`pretrain.train.worker.StopFlag`);
after every step the ranks all-reduce it, so all of them stop after the same step, save it
(complete and atomic, see :mod:`pretrain.checkpoint.layout`) and return 0. A signal during a save
lets the save finish; the stop then happens after the next step. Faults for tests come from
``VITSCALE_FAULT`` (:mod:`pretrain.train.faults`).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint.layout import TRAINING_FORMAT, CheckpointManager
from pretrain.checkpoint.resume import ResumeSource, find_resume_source
from pretrain.core.errors import UserError
from pretrain.core.version import package_version
from pretrain.data.loader import counts_by, sum_counts
from pretrain.data.pipeline import build_eval_data
from pretrain.model.costs import model_costs
from pretrain.model.fp8 import fp8_layers
from pretrain.train.config import Config, identity
from pretrain.train.config_file import save_config
from pretrain.train.ema import Ema
from pretrain.train.engine import Comm, Engine, all_reduce_
from pretrain.train.faults import Faults
from pretrain.train.fewshot_eval import build_fewshot
from pretrain.train.loop import SampleKeysLog, eval_line, evaluate, run_step
from pretrain.train.metrics import (
    HealthWindow,
    MetricsLog,
    Throughput,
    device_peak_flops,
    format_train_line,
    peak_memory_gb,
)
from pretrain.train.mixing import build_mixer
from pretrain.train.prefetch import train_source
from pretrain.train.schedule import lr_at
from pretrain.train.state import BestEval, Components, LoopState, RngState

_SHARDS_SHOWN = 20


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


class Trainer:
    """One rank of a pretraining or fine-tuning run (see the module docstring)."""

    def __init__(self, cfg: Config, mode: str, rank: int, world: int, stop, prepare_model=None,
                 recipe: str | None = None):
        self.given = cfg
        self.cfg = cfg.for_world(world)
        self.mode, self.rank, self.world, self.stop = mode, rank, world, stop
        self.prepare_model = prepare_model
        self.recipe = recipe  # what --config named, for the start record
        self.run_dir = Path(cfg.run.dir)
        self.log = MetricsLog(self.run_dir, rank, cfg.log)
        self.faults = Faults(os.environ.get("VITSCALE_FAULT"), rank)
        self.ckpt = CheckpointManager(self.run_dir, rank, world, cfg.checkpoint.keep, Comm())
        self.state = LoopState()
        self.components = Components()  # filled in _build, once the engine and the data exist
        self.best = BestEval()
        self.preempted = False
        self.lost_shown = 0  # lost samples already reported on the console
        self.last_data: dict = {}  # the latest lost-sample counts, for summary.json

    # ---- set-up ----
    def _build(self, source: ResumeSource | None) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self.spec = cfg.model.spec()
        surgery = (lambda m: self.prepare_model(m, self.log)) if self.prepare_model is not None else None
        model = cfg.model.build(surgery=surgery)
        self.precision = "bf16" if cfg.train.bf16 else "fp32"
        if cfg.model.fp8 != "off":
            how = "FP8 kernels" if torch.cuda.is_available() else "emulated on the CPU"
            self.precision += f", FP8 {cfg.model.fp8} in {len(fp8_layers(model))} block linears ({how})"
        self.costs = model_costs(self.spec, cfg.model.patch_dropout)
        self.engine = Engine(model, cfg, self.world, load_universal=source is not None and source.universal is not None)
        torch.manual_seed(cfg.run.seed + 1000 * (self.rank + 1))  # per-rank stream (dropout, augmentation)
        # a wait for data honours a stop signal; on a GPU batch k+1 is copied while step k computes
        self.train_data = train_source(cfg.loader(), self.rank, self.world, self.engine.device,
                                       interrupted=lambda: self.stop.raised)
        self.eval_data = build_eval_data(cfg.loader(), self.rank, self.world)
        self.fewshot = build_fewshot(cfg, self.rank, self.world, self.spec, self.log)  # labels scanned here
        self.ema = Ema(self.engine, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay else None
        # everything a checkpoint carries besides the engine's weights and optimizer (pretrain/train/state.py)
        self.components = Components({
            "loop": self.state,  # replicated: step, skipped-step counters, summary figures
            "data": self.train_data,  # sharded: each rank's place in the data stream; resharded on a new world size
            "rng": RngState(cfg.run.seed, self.rank, lambda: self.state.step),  # per rank; re-seeded on a new one
            **({"ema": self.ema} if self.ema is not None else {}),  # sharded like the fp32 master weights
            "best": self.best,  # replicated: the best evaluation so far, for summary.json
        })
        self.mixer = build_mixer(cfg.augment, cfg.model.num_classes, cfg.train.loss, cfg.train.label_smoothing,
                                 cfg.run.seed)
        self.ckpt_meta = {"format": TRAINING_FORMAT, **identity(cfg, self.mode), "world_size": self.world}
        self.keys_log = SampleKeysLog(self.run_dir, self.rank) if cfg.log.sample_keys else None

    def _restore(self, source: ResumeSource) -> int:
        """Engine state, then every component's part of the rank file; returns the step. A part
        the checkpoint lacks is the component's declared default (printed) or an error."""
        same_world = source.universal is None
        if same_world:
            self.engine.load(source.tag_dir.parent, source.tag_dir.name)
        else:
            self.engine.load_universal(source.universal)
        notes = self.components.load(lambda r: self.ckpt.load_rank_state(source.tag_dir, r),
                                     int(source.meta.get("world_size", self.world)), self.rank, self.world,
                                     str(source.tag_dir))
        for note in notes:
            self.log.console(note)
        self.state.step = source.step
        where = source.tag_dir if same_world else f"{source.tag_dir} (via {source.universal})"
        self.log.console(f"resumed from {where} at step {self.state.step}")
        self.log.write({"kind": "event", "step": self.state.step, "event": "resumed", "path": str(source.tag_dir),
                        "universal": not same_world})
        return self.state.step

    def run(self, resume: str | None, no_resume: bool) -> int:
        """The whole run on this rank; the logging sinks are closed however it ends."""
        failed = True
        try:
            code = self._run(resume, no_resume)
            failed = False
            return code
        finally:
            self.log.close(failed)

    def _run(self, resume: str | None, no_resume: bool) -> int:
        cfg, log = self.cfg, self.log
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.given, self.run_dir / "config.yaml")
            log.open({**self.given.to_dict(), "recipe": self.recipe, "mode": self.mode, "world_size": self.world})
        source = find_resume_source(self.ckpt, resume, no_resume, identity(cfg, self.mode), self.world, log)
        self._build(source)
        start = self._restore(source) if source is not None else 0
        if self._agree_to_stop():  # signalled during start-up: nothing new to save
            log.console(f"stop signal received before step {start + 1}: exiting (the checkpoint of step {start} "
                        f"stays the latest)")
            log.write({"kind": "event", "step": start, "event": "preempted"})
            self.train_data.close()
            return 0
        train = getattr(self.train_data, "source", self.train_data)  # under the device prefetcher
        for line in train.describe() if hasattr(train, "describe") else []:
            log.console(line)
        shards = getattr(self.eval_data, "shards", None)
        if shards is not None:
            count = f"{shards.samples} samples" if shards.samples is not None else "samples unknown"
            log.console("; ".join([f"data.val: {len(shards.urls)} shards, {count}", *shards.notes]))
        procs = f"{self.world} process{'es' if self.world > 1 else ''}"
        log.console(f"{self.mode}: {cfg.model.label()} {self.costs['params'] / 1e6:.2f}M params, {procs}, ZeRO-"
                    f"{cfg.zero.stage}, {self.precision}, steps {start + 1}..{cfg.train.steps}, "
                    f"{self.given.batch_line(self.world)}, run dir {self.run_dir}")
        log.write({"kind": "event", "step": start, "event": "start", "mode": self.mode, "model": cfg.model.label(),
                   "recipe": self.recipe, "world_size": self.world, "zero_stage": cfg.zero.stage,
                   "total_steps": cfg.train.steps, "global_batch": cfg.train.micro_batch * cfg.train.grad_accum *
                   self.world, "version": package_version()})
        t0 = time.perf_counter()
        self._train()
        if not self.preempted:
            if start < cfg.train.steps:
                self._save(self.state.step, wait=True)
            if cfg.data.val:
                self._evaluate(self.state.step)
            if self.fewshot is not None:
                self.fewshot.run(self.engine, self.state.step)
            self._summary(time.perf_counter() - t0)
        self.train_data.close()
        return 0

    # ---- the loop ----
    def _train(self) -> None:
        cfg, t, state, log = self.cfg, self.cfg.train, self.state, self.log
        peak = device_peak_flops(cfg.log.peak_flops, self.costs["fp8_flops_share"] if cfg.model.fp8 != "off" else 0.0)
        self.meter = Throughput(t.micro_batch * t.grad_accum * self.world, self.costs["train_tflops_per_image"] * 1e12,
                                peak, self.world)
        pending: list[torch.Tensor] = []
        self.engine.train(True)
        self.lost_shown = self._data_stats().get("bad_samples", 0)  # a resumed run's earlier losses were shown
        self.health = HealthWindow(state.step, self.lost_shown, state.bad_steps_total)
        log.start_progress(t.steps, state.step, cfg.log.progress)
        while state.step < t.steps:
            step = state.step + 1
            lr = lr_at(step, base_lr=cfg.optim.lr, total_steps=t.steps, warmup_steps=cfg.optim.warmup_steps,
                       decay=cfg.optim.decay, min_lr=cfg.optim.min_lr)
            self.engine.set_lr(lr)
            t0 = time.perf_counter()
            batches = [self.train_data.next_batch() for _ in range(t.grad_accum)]
            wait = time.perf_counter() - t0
            self.health.add(wait=wait)
            if self.keys_log is not None:
                self.keys_log(step, batches)
            if self.faults.stop(step):
                self.stop.raised = True
            self.faults.hold_for_stop(step, self.stop)
            out = run_step(self.engine, batches, cfg, cfg.model.num_classes, lr, self.faults.loss_fault(step),
                           self.mixer, step, self.rank, self._flags())
            state.step = step
            self.meter.add(1, wait)
            log.advance()
            if out.applied:
                state.bad_steps_in_row = 0
                pending.append(out.loss)
                if self.ema is not None:
                    self.ema.update()
            else:
                self._skipped(step, out.skip_reason)
            if step % t.log_every == 0 or step == t.steps:
                self._log_train(pending, lr)
                pending = []
            if self.ckpt.pending is not None and out.flags[2] == 0:  # every rank's writer is done
                self._publish()
            if self._after_step(step, out.flags):
                break
        log.stop_progress()

    def _skipped(self, step: int, reason: str) -> None:
        state, t = self.state, self.cfg.train
        state.bad_steps_total += 1
        state.bad_steps_in_row += 1
        what = "loss" if reason == "nonfinite_loss" else "gradient norm"
        self.log.write({"kind": "event", "step": step, "event": f"{reason}_skipped",
                        "bad_steps_total": state.bad_steps_total, "bad_steps_in_row": state.bad_steps_in_row})
        self.log.console(f"step {step}: non-finite {what} on some rank, step skipped, weights unchanged "
                         f"({state.bad_steps_in_row} in a row, {state.bad_steps_total} in total)")
        if state.bad_steps_in_row >= t.max_bad_steps:
            self._finish_pending()
            raise UserError(f"{state.bad_steps_in_row} steps in a row had a non-finite loss or gradient "
                            f"(train.max_bad_steps={t.max_bad_steps}, last at step {step}); the run stops "
                            f"to protect the checkpoints (the newest one holds the weights from before "
                            f"these steps). Lower optim.lr, check the data, or resume from an earlier "
                            f"checkpoint")

    def _after_step(self, step: int, flags: tuple[float, ...]) -> bool:
        """Stop request (save, stop), then a due checkpoint, then a due eval; True to stop.
        ``flags``: this step's stop and bad-data flags, already agreed over all ranks."""
        cfg = self.cfg
        if self._stop_agreed(flags):
            self.log.console(f"stop signal received: saving at step {step} and exiting")
            self._save(step, wait=True)
            self.log.write({"kind": "event", "step": step, "event": "preempted"})
            self.preempted = True
            return True
        if step == cfg.train.steps:
            return False  # the final checkpoint and eval follow the loop
        evaluate = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0 and cfg.data.val)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            self._save(step, wait=evaluate)  # an eval that fails must not cost this checkpoint
        if evaluate:
            self._evaluate(step)
            self.meter.reset()
        if self.fewshot is not None and self.fewshot.due(step):
            self.fewshot.run(self.engine, step)
            self.meter.reset()
        return False

    def _flags(self) -> tuple[float, float, float]:
        """This rank's (stop requested, bad data, checkpoint writer busy), agreed in each step."""
        return (1.0 if self.stop.raised else 0.0, 1.0 if self.train_data.problem() else 0.0,
                1.0 if self.ckpt.writing() else 0.0)

    def _stop_agreed(self, flags: tuple[float, ...]) -> bool:
        if flags[1] > 0:
            self._finish_pending()
            raise UserError(self.train_data.problem() or "another rank stopped on bad training data (see its "
                            "message above)")
        return flags[0] > 0

    def _agree_to_stop(self) -> bool:
        """The stop and bad-data flags agreed over all ranks outside a step (at start-up)."""
        flags = all_reduce_(torch.tensor(self._flags(), device=self.engine.device), "max").tolist()
        return self._stop_agreed(tuple(flags))

    # ---- checkpoint, eval, logs ----
    def _save(self, step: int, wait: bool = False) -> None:
        """Checkpoint ``step``: in the background (``checkpoint.async_save``; published at a later
        step boundary, once every rank's writer is done) unless ``wait``."""
        if not _weights_finite(self.engine):
            raise UserError(f"step {step}: the weights hold NaN/Inf; no checkpoint is written. Resume "
                            f"from the previous checkpoint with a lower optim.lr")
        t0 = time.perf_counter()
        self._finish_pending()  # one save in flight at most
        background = self.cfg.checkpoint.async_save and not wait
        path = self.ckpt.save(self.engine, step, self.ckpt_meta, self.components.state_dict(),
                              before_publish=self.faults.save_pause(step), background=background)
        self.save_blocked_s = round(time.perf_counter() - t0, 3)  # how long training stood still
        self.health.add(blocked=self.save_blocked_s)
        if path is not None:
            self.log.write({"kind": "event", "step": step, "event": "checkpoint", "path": str(path),
                            "blocked_s": self.save_blocked_s})

    def _finish_pending(self) -> None:
        """Before a stop every rank agreed on: publish the checkpoint still being written."""
        if self.ckpt.pending is not None:
            self._publish()

    def _publish(self) -> None:
        step = self.ckpt.pending.step
        path = self.ckpt.publish()
        self.log.write({"kind": "event", "step": step, "event": "checkpoint", "path": str(path),
                        "published_at": self.state.step, "blocked_s": self.save_blocked_s})

    def _evaluate(self, step: int) -> None:
        self.faults.eval_failure(step)
        data = self.eval_data
        result = evaluate(self.engine, data, self.cfg)
        bad = sum_counts(Comm.all_gather_object(data.bad))
        record = {"kind": "eval", "step": step, **result, "eval_expected": data.expected}
        if self.ema is not None:
            self.ema.swap_in()
            try:
                ema = evaluate(self.engine, data, self.cfg)
            finally:
                self.ema.swap_out()
            record.update({f"ema_{k}": v for k, v in ema.items() if k != "eval_samples"})
        if data.expected is not None and result["eval_samples"] < data.expected:
            reasons = ", ".join(f"{n} {reason}" for reason, n in counts_by(bad, 0).items()) or "unknown reasons"
            record["eval_unusable"] = counts_by(bad, 1)
            self.log.console(f"warning: eval scored {result['eval_samples']} of the {data.expected} images in "
                             f"{self.cfg.data.val} ({reasons}); check them with `vitscale shards verify`")
        self.state.last_eval = record
        self.best.update(record)
        self.log.write(record)
        self.log.console(eval_line(record))
        lost = self._data_stats().get("bad_samples", 0)  # every rank evaluates: the gather is safe here
        self.log.console(self.health.line(step, lost, self.state.bad_steps_total))

    def _log_train(self, pending: list[torch.Tensor], lr: float) -> None:
        """One metrics record; ``loss`` is the mean over all ranks and the applied steps since the
        last record (every rank calls this at the same steps: one all-reduce, and for shard data
        one gather of the bad-sample counts)."""
        state = self.state
        loss = float("nan")
        if pending:
            per_step = all_reduce_(torch.stack(pending).float(), "sum") / self.world
            loss = per_step.mean().item()
            if state.first_loss is None:
                state.first_loss = per_step[0].item()
        state.last_loss = loss
        norm = self.engine.grad_norm()
        if norm is not None and not math.isfinite(norm) and state.bad_steps_in_row == 0:
            raise RuntimeError(f"DeepSpeed applied an optimizer step with grad norm {norm}; the weights are no "
                               f"longer trustworthy (this DeepSpeed setup does not skip non-finite steps)")
        rec = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, **self.meter.read(),
               "peak_mem_gb": peak_memory_gb(), "bad_steps_total": state.bad_steps_total}
        rec.update(self._data_stats())
        state.images_per_s = rec["images_per_s"]
        self.log.write(rec)
        self.log.console(format_train_line(rec, self.cfg.train.steps))
        lost = rec.get("bad_samples", 0) - self.lost_shown
        if lost > 0:
            self.lost_shown = rec["bad_samples"]
            self.log.console(f"data: {lost} sample{'s' if lost > 1 else ''} lost since the last line "
                             f"({rec['bad_samples']} in all: {_counts_line(rec['bad_by_reason'])}; worst shards "
                             f"{_counts_line(rec.get('bad_by_shard', {}), 3)})")
        self.last_data = {k: rec[k] for k in ("bad_samples", "bad_by_reason", "bad_by_shard", "excluded") if k in rec}
        self.meter.reset()

    def _data_stats(self) -> dict:
        """The loader's bad-sample counts summed over all ranks (shard data only), and the samples
        its dedup.json excluded (``excluded``, only once there are any)."""
        if self.cfg.data.train == "synthetic":
            return {}
        parts = Comm.all_gather_object(self.train_data.stats())
        out = {"epoch": max(p["epoch"] for p in parts), "bad_samples": sum(p["bad_samples"] for p in parts),
               "bad_by_reason": sum_counts([p["bad_by_reason"] for p in parts])}
        if "samples_by_source" in parts[0]:
            out["samples_by_source"] = sum_counts([p["samples_by_source"] for p in parts])
        by_shard = sum_counts([p["bad_by_shard"] for p in parts])
        if by_shard:
            out["bad_by_shard"] = dict(sorted(by_shard.items(), key=lambda kv: -kv[1])[:_SHARDS_SHOWN])
        excluded = sum(p.get("excluded", 0) for p in parts)
        if excluded:
            out["excluded"] = excluded
        return out

    def _summary(self, seconds: float) -> None:
        if self.rank != 0:
            return
        state, ev = self.state, self.state.last_eval
        summary = {"mode": self.mode, "steps": state.step, "first_loss": state.first_loss,
                   "final_loss": state.last_loss, "eval_top1": ev.get("top1"), "eval_top5": ev.get("top5"),
                   "eval_prec1": ev.get("prec1"), "eval_samples": ev.get("eval_samples"),
                   "eval_ema_top1": ev.get("ema_top1"), "eval_ema_prec1": ev.get("ema_prec1"),
                   "images_per_s": state.images_per_s, "bad_steps_total": state.bad_steps_total,
                   "seconds": round(seconds, 1), "run_dir": str(self.run_dir)}
        summary.update(self.fewshot.summary() if self.fewshot is not None else {})
        summary.update(self.last_data)
        summary.update(best_eval=self.best.value, best_eval_step=self.best.step)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        acc = ev.get("top1", ev.get("prec1"))
        print("\n".join([
            f"== {self.mode} done ==",
            f"steps          {state.step}",
            f"loss           {_fmt(state.first_loss)} (first) -> {_fmt(state.last_loss)} (final)",
            f"eval top-1     {'n/a' if acc is None else f'{100 * acc:.1f}%'}",
            f"images/s       {_fmt(state.images_per_s, '.1f')}",
            *([f"lost samples   {self.last_data['bad_samples']} ({_counts_line(self.last_data['bad_by_reason'])})"]
              if self.last_data.get("bad_samples") else []),
            *([f"excluded       {self.last_data['excluded']} (near-copies of evaluation images, dedup.json)"]
              if self.last_data.get("excluded") else []),
            *([f"fewshot        {self.fewshot.line()}"] if self.fewshot is not None else []),
            f"run directory  {self.run_dir}",
        ]), flush=True)
        sys.stdout.flush()


def _weights_finite(engine: Engine) -> bool:
    ok = all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
             for p in engine.module.parameters())
    return all_reduce_(torch.tensor([0.0 if ok else 1.0], device=engine.device), "max").item() == 0


def _counts_line(counts: dict[str, int], top: int = 6) -> str:
    """``{"unreachable": 1800, ...}`` as ``unreachable 1800, ...``, largest first."""
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)
