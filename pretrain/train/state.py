"""The per-rank state a checkpoint carries besides the engine's: named components, each with
``state_dict()`` / ``load_state_dict()`` and a declared ``placement``.

Every rank saves ``{name: component.state_dict()}`` in its file of the checkpoint. What a
component's part means across ranks is declared, and save, load and a change of world size are
written once, here, against that declaration:

- ``replicated``: every rank holds the same state (loop counters, the synthetic stream's global
  position). Any rank's part restores it, on any world size.
- ``per_rank``: each rank's own (its RNG streams). Restored on the same world size; on another
  one the component's declared default is taken (``load_default()``), or the resume is refused.
- ``sharded``: each rank holds its piece of one global state (the EMA's partitions of the fp32
  master weights, each rank's position in the data stream). Restored on the same world size; on
  another one ``reshard(parts)`` gets every old rank's part, in rank order, and builds this
  rank's piece.

Missing state is never silent: a checkpoint without a registered component's part is refused
(:class:`UserError` naming the component and the checkpoint), unless the component declares a
default with ``load_default()``, which puts it in that default and returns the sentence the
trainer prints (the EMA starts at the restored weights; the RNG streams are re-seeded).
The trainer lists every component in one place (``Trainer._build``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pretrain.core.errors import UserError

REPLICATED, PER_RANK, SHARDED = "replicated", "per_rank", "sharded"
PLACEMENTS = (REPLICATED, PER_RANK, SHARDED)


class Stateful(Protocol):
    """A training-state component (see the module docstring). Optional: ``load_default() -> str``
    (the state to start from when a checkpoint has none, and the sentence saying so) and, for
    ``sharded`` components, ``reshard(parts: list[dict]) -> None``."""

    placement: str

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopState:
    """Loop counters and the figures the run summary reports (the same on every rank)."""

    placement = REPLICATED
    step: int = 0
    bad_steps_total: int = 0
    bad_steps_in_row: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    last_eval: dict = field(default_factory=dict)
    images_per_s: float | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


@dataclass
class BestEval:
    """The best evaluation so far (top-1, or precision@1 for multi-label data) and its step, kept
    over resumes so ``summary.json`` names the best checkpoint of the whole run."""

    placement = REPLICATED
    value: float | None = None
    step: int | None = None

    def update(self, record: dict) -> None:
        value = record.get("top1", record.get("prec1"))
        if value is not None and (self.value is None or value > self.value):
            self.value, self.step = float(value), int(record["step"])

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step = state["value"], state["step"]

    def load_default(self) -> str:
        return "the best evaluation is tracked from this step on"


class RngState:
    """This process's Python, NumPy and torch (CPU and CUDA) generators. Nothing that shapes
    training draws from them any more (the model's noise, Mixup / CutMix and the data are seeded
    per step, see :mod:`pretrain.core.seeds`); they are kept so that anything else that does
    continues as it would have. ``step`` gives the restored step for the default."""

    placement = PER_RANK  # meaningless on another world size: re-seeded there instead (the default)

    def __init__(self, seed: int = 0, rank: int = 0, step: Callable[[], int] = lambda: 0):
        self.seed, self.rank, self.step = seed, rank, step

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def load_default(self) -> str:
        step = self.step()
        reseed_rank(self.seed, self.rank, step)
        return f"the RNG streams are re-seeded from (run.seed, rank, step {step})"


def reseed_rank(seed: int, rank: int, step: int) -> None:
    """Per-rank RNG streams as a pure function of (seed, rank, step)."""
    s = seed + 1000 * (rank + 1) + 1_000_003 * step
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class Components:
    """The named stateful components of one rank, saved and restored together."""

    def __init__(self, items: dict[str, Stateful] | None = None):
        self._items: dict[str, Stateful] = {}
        for name, component in (items or {}).items():
            self.register(name, component)

    def register(self, name: str, component: Stateful) -> None:
        if name in self._items:
            raise ValueError(f"component {name!r} is registered twice")
        placement = getattr(component, "placement", None)
        if placement not in PLACEMENTS:
            raise ValueError(f"component {name!r} declares no placement (one of {', '.join(PLACEMENTS)})")
        if placement == SHARDED and not callable(getattr(component, "reshard", None)):
            raise ValueError(f"sharded component {name!r} has no reshard(parts) for another world size")
        self._items[name] = component

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def state_dict(self) -> dict:
        return {name: c.state_dict() for name, c in self._items.items()}

    def load(self, read_rank: Callable[[int], dict | None], saved_world: int, rank: int, world: int,
             where: str) -> list[str]:
        """Restore every component from checkpoint ``where``, written by ``saved_world`` ranks
        (``read_rank(r)``: rank ``r``'s saved parts, read only when needed), for ``rank`` of
        ``world``; returns the sentences about defaults taken, for the console."""
        same = saved_world == world
        own = read_rank(rank if same else 0) or {}
        everyone: list[dict] | None = None
        notes = []
        for name, c in self._items.items():
            if name not in own:
                notes.append(f"{where} holds no {name!r} state: {self.load_default(name, where)}")
            elif same or c.placement == REPLICATED:
                c.load_state_dict(own[name])
            elif c.placement == PER_RANK:
                notes.append(f"{where} was saved by {saved_world} ranks, so this rank's {name!r} state is not in "
                             f"it: {self.load_default(name, where)}")
            else:
                everyone = everyone or [read_rank(r) or {} for r in range(saved_world)]
                lacking = [r for r, part in enumerate(everyone) if name not in part]
                if lacking:
                    raise UserError(f"checkpoint {where}: rank {lacking[0]}'s file holds no {name!r} state, so it "
                                    f"cannot be resharded for {world} ranks; resume on {saved_world} ranks")
                c.reshard([part[name] for part in everyone])
        return notes

    def load_default(self, name: str, where: str) -> str:
        """Put component ``name`` in its declared default (a checkpoint ``where`` lacks its part);
        returns what that default is, or raises :class:`UserError` when it declares none."""
        default = getattr(self._items[name], "load_default", None)
        if default is None:
            raise UserError(f"checkpoint {where} holds no state for the {name!r} component of this run, and "
                            f"{name!r} has no default to start from: resume from a checkpoint written by this "
                            f"version of vitscale with the same config, or start afresh (--no-resume with a new "
                            f"run.dir)")
        return default()
