"""The per-rank state a checkpoint carries besides the engine's: components with
``state_dict()`` / ``load_state_dict()``.

The trainer registers every stateful piece under a name (``loop`` counters, the ``data``
position, the ``rng`` states, and any later addition such as EMA weights); the checkpoint layer
saves ``{name: component.state_dict()}`` in each rank's file and gives each component its part
back on resume. Adding a component is one ``Components.register`` call.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


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
    """This process's Python, NumPy and torch (CPU and CUDA) generators."""

    per_rank = True  # meaningless on another world size: re-seeded there instead

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

    def load_state_dict(self, state: dict, same_world: bool = True) -> list[str]:
        """Give every component its saved part; components marked ``per_rank`` are skipped when
        the world size changed. Returns the names that had no saved part (a checkpoint written
        before they existed), which keep their fresh state."""
        missing = []
        for name, c in self._items.items():
            if getattr(c, "per_rank", False) and not same_world:
                continue
            if name in state:
                c.load_state_dict(state[name])
            else:
                missing.append(name)
        return missing
