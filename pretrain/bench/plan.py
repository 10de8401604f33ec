"""The plan of ``vitscale bench train`` and its pure decisions: which configurations run, the
largest micro batch that fits (given a trial function), and whether the time budget allows
another configuration. Nothing here touches a device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pretrain.core.errors import UserError
from pretrain.data.config import DataConfig
from pretrain.train.config import Config, ModelConfig, TrainConfig, ZeroConfig

TIMM_MODEL = "vit_huge_patch14_224"
TIMM_REFERENCE = ("vit_h14", 224)  # our variant with the dimensions of timm's model (which has no pre-logits)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    model: str
    img_size: int
    zero_stage: int
    act_ckpt: bool
    compile: bool

    def _flags(self) -> list[str]:
        return [f"z{self.zero_stage}"] + (["ckpt"] if self.act_ckpt else []) + (["compile"] if self.compile else [])

    @property
    def label(self) -> str:
        """For people: ``vit_h14@224 z2 ckpt``."""
        return f"{self.model}@{self.img_size} " + " ".join(self._flags())

    @property
    def spec(self) -> str:
        """The ``--extra`` spelling: ``vit_h14@224:z2:ckpt``."""
        return f"{self.model}@{self.img_size}:" + ":".join(self._flags())

    @property
    def search_key(self) -> tuple:
        """Configurations that share one micro batch search: compiled ones reuse the eager result,
        and ZeRO-3 is probed with ZeRO-2 engines (see :class:`pretrain.bench.measure.EngineProbe`)."""
        return (self.model, self.img_size, 2 if self.zero_stage == 3 else self.zero_stage, self.act_ckpt)


def case_config(case: Case, micro_batch: int) -> Config:
    """The run config of ``case``: library defaults (1000 classes, pre-logits head, no dropout,
    AdamW, grad clip 1.0, bf16) with the case's model, size, stage and flags."""
    model = ModelConfig(name=case.model, img_size=case.img_size, act_ckpt=case.act_ckpt, compile=case.compile)
    return Config(model=model, data=DataConfig(train="synthetic"), zero=ZeroConfig(stage=case.zero_stage),
                  train=TrainConfig(micro_batch=micro_batch, grad_accum=1, bf16=True))


def _flag_values(text: str, name: str) -> list[bool]:
    values = {"off": [False], "on": [True], "both": [False, True]}
    if text not in values:
        raise UserError(f"--{name} {text!r}: use both, on or off")
    return values[text]


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} {text!r}: give comma-separated integers, e.g. 224,384") from None


def parse_extra(text: str, default_stage: int) -> Case:
    """``MODEL[@SIZE][:zN][:ckpt][:compile]`` -> Case, e.g. ``vit_h14@518``, ``vit_b16@224:z3:ckpt``.
    Unnamed parts: size 224, ZeRO stage ``default_stage``, no activation checkpointing, eager."""
    head, *flags = text.strip().split(":")
    model, _, size = head.partition("@")
    try:
        img_size = int(size) if size else 224
    except ValueError:
        raise UserError(f"--extra {text!r}: the size after @ must be an integer, e.g. vit_h14@518") from None
    stage, ckpt, comp = default_stage, False, False
    for flag in flags:
        if re.fullmatch(r"z[0-3]", flag):
            stage = int(flag[1])
        elif flag == "ckpt":
            ckpt = True
        elif flag == "compile":
            comp = True
        else:
            raise UserError(f"--extra {text!r}: unknown part {flag!r}; write MODEL@SIZE[:zN][:ckpt][:compile], "
                            f"e.g. vit_h14@224:z3:ckpt")
    return Case(model, img_size, stage, ckpt, comp)


def build_plan(models: str, img_sizes: str, zero_stages: str, act_ckpt: str, compile_: str,
               extras: list[str]) -> list[Case]:
    """Grid then extras, duplicates dropped, each configuration validated (unknown model, size not
    a multiple of the patch, compile under ZeRO-3) before anything runs. The grid leaves out
    compile x ZeRO-3, which a run refuses; named as an ``--extra`` it is an error."""
    stages = _int_list(zero_stages, "zero-stages")
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        raise UserError(f"--zero-stages {zero_stages!r}: use stages among 0,1,2,3, e.g. 1,2,3")
    plan = [Case(m.strip(), size, stage, ckpt, comp)
            for m in models.split(",") if m.strip()
            for size in _int_list(img_sizes, "img-sizes")
            for stage in stages
            for comp in _flag_values(compile_, "compile")
            for ckpt in _flag_values(act_ckpt, "act-ckpt")
            if not (comp and stage == 3)]  # refused by the config (model.compile), as in a real run
    plan += [parse_extra(e, stages[0]) for text in extras for e in text.split(",") if e.strip()]
    plan = list(dict.fromkeys(plan))
    if not plan:
        raise UserError("the plan is empty: give --models (e.g. vit_b16) or --extra (e.g. vit_h14@518)")
    for case in plan:
        case_config(case, 1)
    return plan


@dataclass
class FitSearch:
    """Outcome of :func:`largest_fitting`: the largest micro batch that fitted (None: not even 1)
    and every trial in order as (micro batch, fitted)."""

    best: int | None
    trials: list[tuple[int, bool]] = field(default_factory=list)


def largest_fitting(try_fn: Callable[[int], None], start: int, limit: int = 512, align: int = 1,
                    tolerance: float = 0.125,
                    oom_types: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)) -> FitSearch:
    """Largest micro batch ``n <= limit`` for which ``try_fn(n)`` returns without raising one of
    ``oom_types`` (other exceptions propagate).

    Doubles from ``start`` until a failure or ``limit``; if ``start`` already fails, halves down to
    1. Then bisects between the largest fit and the smallest failure on multiples of ``align``
    until they are at most ``max(align, tolerance x best)`` apart. Assumes fitting is monotone.
    """
    if start < 1 or limit < 1 or align < 1:
        raise ValueError(f"start, limit and align must be >= 1, got {start}, {limit}, {align}")
    trials: list[tuple[int, bool]] = []

    def fits(n: int) -> bool:
        try:
            try_fn(n)
        except oom_types:
            trials.append((n, False))
            return False
        trials.append((n, True))
        return True

    lo, hi, n = 0, None, min(start, limit)
    while hi is None:
        if fits(n):
            lo = n
            if n >= limit:
                return FitSearch(lo, trials)
            n = min(2 * n, limit)
        else:
            hi = n
    n = hi // 2
    while lo == 0 and n >= 1:
        if fits(n):
            lo = n
        else:
            hi, n = n, n // 2
    if lo == 0:
        return FitSearch(None, trials)
    while hi - lo > max(align, int(lo * tolerance)):
        mid = lo + (hi - lo) // 2 // align * align
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return FitSearch(lo, trials)


def shrink(micro_batch: int, align: int) -> int:
    """The micro batch to retry with after an OOM in a measurement: about 3/4, on ``align``."""
    smaller = micro_batch * 3 // 4
    return max(1, smaller // align * align if smaller >= align else smaller)


class Budget:
    """Wall-clock budget: a configuration starts only if the time spent so far plus what a
    similar configuration took (the longest so far with the same compile flag, else the longest
    of any) stays within ``seconds``; whatever still runs at :meth:`kill_at` (``seconds`` plus 10%,
    at least 30 s) is stopped. ``None`` means no budget."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()
        self.took: dict[bool, float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, compiled: bool) -> bool:
        if self.seconds is None:
            return True
        expected = self.took.get(compiled, max(self.took.values(), default=0.0))
        return self.elapsed() + expected <= self.seconds

    def kill_at(self) -> float | None:
        """The clock reading at which a running configuration is stopped (None: never)."""
        if self.seconds is None:
            return None
        return self.start + self.seconds + max(30.0, 0.1 * self.seconds)

    def record(self, compiled: bool, seconds: float) -> None:
        self.took[compiled] = max(self.took.get(compiled, 0.0), seconds)
