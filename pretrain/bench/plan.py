"""The plan of ``vitscale bench train`` and its pure decisions: which configurations run (a grid,
``--extra`` configurations, or a named suite), the largest micro batch that fits (given a trial
function), which earlier measurement a configuration follows, and whether the time budget allows
another configuration. Nothing here touches a device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from pretrain.core.errors import UserError
from pretrain.data.config import DataConfig
from pretrain.model.fp8 import FP8_MODES
from pretrain.train.config import Config, ModelConfig, TrainConfig, ZeroConfig

TIMM_MODEL = "vit_huge_patch14_224"
TIMM_REFERENCE = ("vit_h14", 224)  # our variant with the dimensions of timm's model (which has no pre-logits)
LOADERS = ("cpu", "gpu")  # data.decode of the real shard loader cases

# Named suites: configurations in order of value, so that a budget cut loses the least. "bestckpt"
# follows the faster of the activation-checkpointing settings measured before it (see
# :func:`reference_record`); "timm" trains timm's ViT at that configuration's micro batch.
_H, _B, _L = "vit_h14@224", "vit_b16@224", "vit_l16@224"
SUITES = {
    "gpu": [f"{_H}:z2", f"{_H}:z2:ckpt", f"{_H}:timm", f"{_H}:z3:bestckpt", f"{_H}:z2:bestckpt:fp8",
            f"{_H}:z2:bestckpt:shards-cpu", f"{_H}:z2:bestckpt:shards-gpu", f"{_B}:z2", f"{_L}:z2",
            f"{_H}:z2:bestckpt:compile", f"{_H}:z2:bestckpt:compile:fp8"],
}
# --tiny: the same suite on stand-ins that train in seconds on a CPU (a rehearsal of the GPU run)
TINY_STAND_INS = {_H: "vit_test4@32", _B: "vit_micro4@16", _L: "vit_test8@32"}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``act_ckpt`` None: the faster setting of the earlier
    measurements of this model (resolved when it runs). ``fp8``: ``model.fp8``. ``loader``: None
    for a synthetic batch that lives on the device, else the real shard loader with that
    ``data.decode``. ``framework`` ``"timm"``: timm's VisionTransformer of the same dimensions in
    a plain torch loop, at the micro batch and flags of the fastest earlier measurement."""

    model: str
    img_size: int
    zero_stage: int
    act_ckpt: bool | None
    compile: bool
    fp8: str = "off"
    loader: str | None = None
    framework: str = "vitscale"

    def _flags(self) -> list[str]:
        if self.framework == "timm":
            return ["timm"]
        ckpt = ["bestckpt"] if self.act_ckpt is None else ["ckpt"] if self.act_ckpt else []
        return ([f"z{self.zero_stage}"] + ckpt + (["compile"] if self.compile else [])
                + ([] if self.fp8 == "off" else ["fp8" if self.fp8 == "tensorwise" else f"fp8={self.fp8}"])
                + ([f"shards-{self.loader}"] if self.loader else []))

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
        """Configurations that share one micro batch search: compiled, FP8 and shard-loader ones
        reuse the eager bf16 result, and ZeRO-3 is probed with ZeRO-2 engines (see
        :class:`pretrain.bench.measure.EngineProbe`)."""
        return (self.model, self.img_size, 2 if self.zero_stage == 3 else self.zero_stage, self.act_ckpt)


def case_config(case: Case, micro_batch: int, shards: str | None = None, workers: int = 0) -> Config:
    """The run config of ``case``: library defaults (1000 classes, pre-logits head, no dropout,
    AdamW, grad clip 1.0, bf16) with the case's model, size, stage and flags; with ``loader``, the
    shard set ``shards`` read by ``workers`` loader processes with that ``data.decode``."""
    model = ModelConfig(name=case.model, img_size=case.img_size, act_ckpt=bool(case.act_ckpt), compile=case.compile,
                        fp8=case.fp8)
    data = DataConfig(train="synthetic")
    if case.loader:
        data = DataConfig(train=shards or "SHARDS", val=None, workers=workers, decode=case.loader)
    return Config(model=model, data=data, zero=ZeroConfig(stage=case.zero_stage),
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
    """``MODEL[@SIZE][:zN][:ckpt|:bestckpt][:compile][:fp8[=RECIPE]][:shards-cpu|:shards-gpu]`` or
    ``MODEL[@SIZE]:timm`` -> Case, e.g. ``vit_h14@518``, ``vit_b16@224:z3:ckpt``,
    ``vit_h14@224:z2:bestckpt:compile:fp8``. Unnamed parts: size 224, ZeRO stage ``default_stage``,
    no activation checkpointing, eager, bf16, a synthetic batch on the device."""
    head, *flags = text.strip().split(":")
    model, _, size = head.partition("@")
    try:
        img_size = int(size) if size else 224
    except ValueError:
        raise UserError(f"--extra {text!r}: the size after @ must be an integer, e.g. vit_h14@518") from None
    if "timm" in flags:
        if flags != ["timm"]:
            raise UserError(f"--extra {text!r}: a timm baseline takes its flags from the measurement it follows; "
                            f"write MODEL@SIZE:timm, e.g. vit_h14@224:timm")
        return Case(model, img_size, 2, None, False, framework="timm")
    stage, ckpt, comp, fp8, loader = default_stage, False, False, "off", None
    for flag in flags:
        if re.fullmatch(r"z[0-3]", flag):
            stage = int(flag[1])
        elif flag in ("ckpt", "bestckpt"):
            ckpt = True if flag == "ckpt" else None
        elif flag == "compile":
            comp = True
        elif flag == "fp8" or flag.startswith("fp8="):
            fp8 = flag.partition("=")[2] or "tensorwise"
            if fp8 not in FP8_MODES[1:]:
                raise UserError(f"--extra {text!r}: {flag!r}: use fp8 (tensorwise) or fp8=rowwise")
        elif flag.startswith("shards-") and flag[7:] in LOADERS:
            loader = flag[7:]
        else:
            raise UserError(f"--extra {text!r}: unknown part {flag!r}; write MODEL@SIZE[:zN][:ckpt|:bestckpt]"
                            f"[:compile][:fp8[=rowwise]][:shards-cpu|:shards-gpu] or MODEL@SIZE:timm, e.g. "
                            f"vit_h14@224:z3:ckpt")
    return Case(model, img_size, stage, ckpt, comp, fp8, loader)


def suite_extras(name: str, tiny: bool = False) -> list[str]:
    """The configurations of suite ``name`` (:data:`SUITES`) as ``--extra`` spellings; ``tiny``
    puts the stand-ins of :data:`TINY_STAND_INS` in place of the models."""
    if name not in SUITES:
        raise UserError(f"--suite {name!r}: use one of {', '.join(SUITES)}")
    if not tiny:
        return list(SUITES[name])
    out = []
    for text in SUITES[name]:
        model, _, flags = text.partition(":")
        out.append(f"{TINY_STAND_INS[model]}:{flags}")
    return out


def build_plan(models: str, img_sizes: str, zero_stages: str, act_ckpt: str, compile_: str,
               extras: list[str], timm: bool = False) -> list[Case]:
    """Grid then extras, duplicates dropped, each configuration validated (unknown model, size not
    a multiple of the patch, compile under ZeRO-3, FP8 on a width FP8 cannot take) before anything
    runs. The grid leaves out compile x ZeRO-3, which a run refuses; named as an ``--extra`` it is
    an error. ``timm``: the baseline ``vit_h14@224:timm`` right after the grid's last vit_h14@224
    configuration, else at the end."""
    stages = _int_list(zero_stages, "zero-stages")
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        raise UserError(f"--zero-stages {zero_stages!r}: use stages among 0,1,2,3, e.g. 1,2,3")
    grid = [Case(m.strip(), size, stage, ckpt, comp)
            for m in models.split(",") if m.strip()
            for size in _int_list(img_sizes, "img-sizes")
            for stage in stages
            for comp in _flag_values(compile_, "compile")
            for ckpt in _flag_values(act_ckpt, "act-ckpt")
            if not (comp and stage == 3)]  # refused by the config (model.compile), as in a real run
    extra = [parse_extra(e, stages[0]) for text in extras for e in text.split(",") if e.strip()]
    if timm:
        baseline = Case(*TIMM_REFERENCE, 2, None, False, framework="timm")
        last = max((i for i, c in enumerate(grid) if (c.model, c.img_size) == TIMM_REFERENCE), default=None)
        if last is None:
            extra.append(baseline)
        else:
            grid.insert(last + 1, baseline)
    plan = list(dict.fromkeys(grid + extra))
    if not plan:
        raise UserError("the plan is empty: give --models (e.g. vit_b16) or --extra (e.g. vit_h14@518)")
    for case in plan:
        case_config(replace(case, framework="vitscale"), 1)
    return plan


def reference_record(records: list[dict], case: Case) -> dict | None:
    """The measurement ``case`` follows (for ``act_ckpt`` None, and for a timm baseline's micro
    batch and flags): the fastest successful earlier record of our engine with the same model and
    image size, in bf16 on the synthetic device batch; None when there is none yet."""
    same = [r for r in records if r["framework"] == "vitscale" and r["model"] == case.model
            and r["img_size"] == case.img_size and r["fp8"] == "off" and r["loader"] is None
            and r["images_per_s"] and not r["error"]]
    return max(same, key=lambda r: r["images_per_s"], default=None)


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
