"""The per-rank state a checkpoint carries besides the engine's: components with
``state_dict()`` / ``load_state_dict()``.

The trainer registers every stateful piece under a name (``loop`` counters, the ``data``
position, the ``rng`` states, and any later addition such as EMA weights); the checkpoint layer
saves ``{name: component.state_dict()}`` in each rank's file and gives each component its part
back on resume. Adding a component is one ``Components.register`` call.

Missing state is never silent: a checkpoint without a registered component's part is refused
(:class:`UserError` naming the component and the checkpoint), unless the component declares a
default with ``load_default()``, which puts it in that default and returns the sentence the
trainer prints (the EMA starts at the restored weights; the RNG streams are re-seeded).
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


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopState:
    """Loop counters and the figures the run summary reports."""

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


class RngState:
    """This process's Python, NumPy and torch (CPU and CUDA) generators. Nothing that shapes
    training draws from them any more (the model's noise, Mixup / CutMix and the data are seeded
    per step, see :mod:`pretrain.core.seeds`); they are kept so that anything else that does
    continues as it would have. ``step`` gives the restored step for the default."""

    per_rank = True  # meaningless on another world size: re-seeded there instead

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

    def __init__(self):
        self._items: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful) -> None:
        if name in self._items:
            raise ValueError(f"component {name!r} is registered twice")
        self._items[name] = component

    def state_dict(self) -> dict:
        return {name: c.state_dict() for name, c in self._items.items()}

    def load_state_dict(self, state: dict, where: str, same_world: bool = True) -> list[str]:
        """Give every component its saved part of ``state`` (read from checkpoint ``where``);
        components marked ``per_rank`` are skipped when the world size changed. A component
        without a saved part takes its declared default (``load_default()``); the sentences
        saying so are returned for the console. One without a default is a :class:`UserError`."""
        defaults = []
        for name, c in self._items.items():
            if getattr(c, "per_rank", False) and not same_world:
                continue
            if name in state:
                c.load_state_dict(state[name])
            else:
                defaults.append(f"{where} holds no {name!r} state: {self.load_default(name, where)}")
        return defaults

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
