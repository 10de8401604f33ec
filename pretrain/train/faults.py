"""Fault injection for the fault-tolerance tests, read from the ``VITSCALE_FAULT`` variable.

``VITSCALE_FAULT="nan@5,6:rank1;stop@10"``: faults separated by ``;``, each ``KIND@STEPS[:rankR]``
(STEPS: steps and ranges ``a-b`` separated by commas; without ``:rankR`` on every rank):

- ``nan``       the loss of that step is NaN
- ``nangrad``   the loss is finite but its gradient is NaN (a non-finite grad norm)
- ``stop``      as if SIGUSR1 arrived during that step (a preemption at a known step)
- ``slowsave``  the save at that step pauses ``SLOW_SAVE_S`` seconds after its files are written,
                before it becomes visible (a window to kill or signal the job mid-save)
- ``evalfail``  the evaluation at that step fails with a user error (as unreadable val data would)
- ``holdstop``  the rank holds before that step until it has received a stop signal (at most
                ``HOLD_S`` seconds), so a signal sent any time before is acted on at exactly
                that step: a test waits for a condition instead of racing the run to its end

Unset in real runs. An unknown kind is an error, so a typo cannot silently test nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pretrain.core.errors import UserError

KINDS = ("nan", "nangrad", "stop", "slowsave", "evalfail", "holdstop")
SLOW_SAVE_S = 4.0
HOLD_S = 300.0


class _NanGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _steps(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


class Faults:
    def __init__(self, spec: str | None, rank: int):
        self.at: dict[str, set[int]] = {k: set() for k in KINDS}
        for item in filter(None, (spec or "").split(";")):
            kind, _, rest = item.strip().partition("@")
            steps, _, where = rest.partition(":")
            if kind not in KINDS:
                raise ValueError(f"VITSCALE_FAULT: unknown fault {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
            if not where or int(where.removeprefix("rank")) == rank:
                self.at[kind] |= _steps(steps)

    def loss_fault(self, step: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if step in self.at["nan"]:
            return lambda loss: loss * float("nan")
        if step in self.at["nangrad"]:
            return _NanGrad.apply
        return None

    def stop(self, step: int) -> bool:
        return step in self.at["stop"]

    def hold_for_stop(self, step: int, stop) -> None:
        """Before ``step``: wait until ``stop.raised`` (set by the signal handler)."""
        if step not in self.at["holdstop"]:
            return
        deadline = time.monotonic() + HOLD_S
        while not stop.raised:
            if time.monotonic() > deadline:
                raise RuntimeError(f"VITSCALE_FAULT holdstop@{step}: no stop signal within {HOLD_S:.0f} s")
            time.sleep(0.01)

    def save_pause(self, step: int) -> Callable[[], None] | None:
        return (lambda: time.sleep(SLOW_SAVE_S)) if step in self.at["slowsave"] else None

    def eval_failure(self, step: int) -> None:
        if step in self.at["evalfail"]:
            raise UserError(f"evaluation at step {step} failed (injected by VITSCALE_FAULT)")
