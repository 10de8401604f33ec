"""One measurement of ``vitscale bench train``, run in a process of its own (one rank, world size 1).

Each configuration runs in a process of its own (:mod:`pretrain.bench.child`, which says why).

A measurement runs three passes on one engine, built as a run builds it (``ModelConfig.build``:
checkpointing, FP8, compile) and fed by a synthetic batch that already lives on the device (so the
data wait is the cost of handing it over, about zero), or for a shard-loader case by the training
loader itself (:func:`pretrain.train.prefetch.train_source`, as the trainer reads it):

1. ``warmup`` steps (allocator growth, optimizer state, ``torch.compile``, loader workers starting);
2. the timed pass: ``steps`` full training steps exactly as training runs them
   (:func:`pretrain.train.loop.train_step`, with its one host sync per step for the non-finite check)
   and a single device synchronisation at the end; images/s comes from this pass only, and
   ``data_wait_frac`` is the share of it spent in ``next_batch()``;
3. the instrumented pass: one step whose forward runs under ``torch.profiler`` (to read which SDPA
   kernel ran), then ``phase_steps`` steps with a device synchronisation after each phase
   (data, forward + loss, backward, optimizer step); the per-phase means are the step breakdown.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

from pretrain.bench.evidence import compile_watch, sdpa_summary
from pretrain.bench.plan import Case, case_config
from pretrain.data.batch import Batch
from pretrain.model.vit import ViTSpec
from pretrain.train.config import Config
from pretrain.train.engine import Engine
from pretrain.train.loop import train_step
from pretrain.train.losses import classification_loss
from pretrain.train.metrics import peak_memory_gb
from pretrain.train.prefetch import train_source

NUM_CLASSES = 1000

@dataclass(frozen=True)
class Passes:
    """How many steps each pass runs (see the module docstring)."""

    warmup: int = 3
    steps: int = 10
    phase_steps: int = 3


class Stepper(Protocol):
    """One way of training a model: the whole step, or its phases one by one."""

    def train_step(self, batch: Batch) -> torch.Tensor: ...

    def forward(self, batch: Batch) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Collect garbage and hand cached blocks back to the device, e.g. after an OOM."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """True for a device out-of-memory error, also when a library (dynamo, cuBLAS) re-raised it
    as another exception type."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() \
                or "ALLOC_FAILED" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def oom_guard(fn: Callable[[], dict], micro_batch: int) -> dict:
    """``fn()`` with any OOM turned into ``torch.cuda.OutOfMemoryError`` raised after the failed
    attempt's frames (and the tensors they hold) are gone and the cache is emptied."""
    oom = None
    try:
        return fn()
    except Exception as err:
        if not is_oom(err):
            raise
        oom = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    free_memory()
    raise torch.cuda.OutOfMemoryError(f"micro batch {micro_batch}: {oom}")


class BatchSource(Protocol):
    """Where a measurement takes its micro batches (a training loader's interface)."""

    def next_batch(self) -> Batch: ...


class DeviceBatches:
    """The same device-resident batch (float32 images, class-index targets) on every call."""

    def __init__(self, micro_batch: int, img_size: int, num_classes: int, dev: torch.device):
        g = torch.Generator(device=dev).manual_seed(0)
        self.batch = Batch(torch.randn(micro_batch, 3, img_size, img_size, generator=g, device=dev),
                           torch.randint(0, num_classes, (micro_batch,), generator=g, device=dev))

    def next_batch(self) -> Batch:
        return self.batch


class EngineStepper:
    """Our DeepSpeed engine, stepped as :func:`pretrain.train.loop.train_step` steps it."""

    def __init__(self, engine: Engine, cfg: Config):
        self.engine, self.cfg = engine, cfg

    def train_step(self, batch: Batch) -> torch.Tensor:
        loss, _ = train_step(self.engine, [batch], self.cfg, self.cfg.model.num_classes, self.cfg.optim.lr)
        return loss

    def forward(self, batch: Batch) -> torch.Tensor:
        logits = self.engine.forward(batch.images)
        return classification_loss(logits, batch.targets.to(logits.device), self.cfg.train.loss)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def timed_pass(stepper: Stepper, data: BatchSource, steps: int) -> tuple[float, float, float]:
    """Wall seconds of ``steps`` training steps (one sync before and one after), the last loss, and
    the seconds spent waiting in ``next_batch()``."""
    sync()
    t0 = time.perf_counter()
    loss, wait = None, 0.0
    for _ in range(steps):
        t1 = time.perf_counter()
        batch = data.next_batch()
        wait += time.perf_counter() - t1
        loss = stepper.train_step(batch)
    sync()
    seconds = time.perf_counter() - t0
    return seconds, float(loss.item()) if loss is not None else float("nan"), wait


def phase_pass(stepper: Stepper, data: BatchSource, steps: int) -> tuple[dict[str, float], set[str]]:
    """Mean seconds per phase over ``steps`` synchronised steps, after one step whose forward is
    profiled; returns the breakdown and the names of every op and kernel the profiled forward ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        loss = stepper.forward(data.next_batch())
        sync()
    names = {event.name for event in prof.events()}
    stepper.backward(loss)
    stepper.step()
    del loss
    totals = {"data_wait_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        batch = data.next_batch()
        t1 = time.perf_counter()
        loss = stepper.forward(batch)
        sync()
        t2 = time.perf_counter()
        stepper.backward(loss)
        sync()
        t3 = time.perf_counter()
        stepper.step()
        sync()
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[key] += dt
    return {k: v / max(steps, 1) for k, v in totals.items()}, names


def measure(stepper: Stepper, spec: ViTSpec, micro_batch: int, passes: Passes,
            data: BatchSource | None = None) -> dict:
    """The three passes on ``stepper`` fed by ``data`` (default: :class:`DeviceBatches`); images/s,
    step time, data-wait share, peak memory, breakdown, SDPA backend."""
    data = data or DeviceBatches(micro_batch, spec.img_size, NUM_CLASSES, device())
    for _ in range(passes.warmup):
        stepper.train_step(data.next_batch())
    seconds, loss, wait = timed_pass(stepper, data, passes.steps)
    peak_gb = peak_memory_gb()
    phases, names = phase_pass(stepper, data, passes.phase_steps)
    backend, check = sdpa_summary(spec, micro_batch, names, device())
    return {"images_per_s": round(passes.steps * micro_batch / seconds, 2),
            "step_time_s": round(seconds / passes.steps, 5), "data_wait_frac": round(wait / seconds, 5),
            "final_loss": round(loss, 4), "peak_mem_gb": round(peak_gb, 3),
            "step_breakdown": {k: round(v, 6) for k, v in phases.items()}, "sdpa_backend": backend,
            "sdpa_check": check}


def build_engine(case: Case, micro_batch: int, shards: str | None = None, workers: int = 0) -> tuple[Engine, Config]:
    """A fresh model, built as a run builds it (:meth:`ModelConfig.build`: checkpointing, FP8,
    compile), in a fresh DeepSpeed engine."""
    cfg = case_config(case, micro_batch, shards, workers)
    torch.manual_seed(0)
    return Engine(cfg.model.build(device=str(device())), cfg, 1), cfg


def loader_source(cfg: Config) -> BatchSource:
    """The training loader of ``cfg`` for this one rank, read as the trainer reads it; without
    CUDA, ``data.decode=gpu`` runs its code path on the CPU (a rehearsal, not a figure)."""
    spec = cfg.loader()
    if not torch.cuda.is_available():
        spec = replace(spec, decode_device="cpu")
    return train_source(spec, 0, 1, device())


def destroy_engine(engine: Engine | None) -> None:
    """Remove DeepSpeed's hooks and free memory (a ZeRO-3 engine stays reachable all the same:
    hence one process per measurement)."""
    if engine is not None:
        with contextlib.suppress(Exception):  # best effort: an OOM may have left the engine half-updated
            engine.engine.destroy()
    free_memory()


class EngineProbe:
    """``try_fn`` for :func:`pretrain.bench.plan.largest_fitting`: two full training steps
    (optimizer state included) at a micro batch, on one eager engine reused while batches fit.
    After an OOM the engine is destroyed and the next probe builds a new one; the OOM is re-raised
    as ``torch.cuda.OutOfMemoryError``. ZeRO-3 is probed with a ZeRO-2 engine, because discarded
    ZeRO-3 engines keep their memory (one rank: the same states, without the gather buffers)."""

    def __init__(self, case: Case):
        stage = 2 if case.zero_stage == 3 else case.zero_stage
        self.case = Case(case.model, case.img_size, stage, case.act_ckpt, compile=False)
        self.engine: Engine | None = None
        self.cfg: Config | None = None

    def __call__(self, micro_batch: int) -> None:
        try:
            oom_guard(lambda: self._steps(micro_batch), micro_batch)
        except torch.cuda.OutOfMemoryError:
            self.close()
            raise

    def _steps(self, micro_batch: int) -> dict:
        if self.engine is None:
            self.engine, self.cfg = build_engine(self.case, micro_batch)
        data = DeviceBatches(micro_batch, self.case.img_size, NUM_CLASSES, device())
        stepper = EngineStepper(self.engine, self.cfg)
        for _ in range(2):
            stepper.train_step(data.next_batch())
        sync()
        return {}

    def close(self) -> None:
        engine, self.engine = self.engine, None
        destroy_engine(engine)


def measure_engine(case: Case, micro_batch: int, passes: Passes, shards: str | None = None,
                   workers: int = 0) -> dict:
    """:func:`measure` of our engine for ``case`` (with ``case.loader``: fed by the shard set
    ``shards`` through ``workers`` loader processes), plus ``compile_stats``. Raises
    ``torch.cuda.OutOfMemoryError`` when the micro batch does not fit."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def run() -> dict:
        with compile_watch() as stats:
            engine, cfg = build_engine(case, micro_batch, shards, workers)
            data = loader_source(cfg) if case.loader else None
            try:
                result = measure(EngineStepper(engine, cfg), cfg.model.spec(), micro_batch, passes, data)
            finally:
                if data is not None:
                    data.close()
                destroy_engine(engine)
        return {**result, "compile_stats": asdict(stats) if case.compile else None}

    return oom_guard(run, micro_batch)
