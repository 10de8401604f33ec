"""The ``fewshot`` section of the run config: few-shot linear evaluation during training.

::

    fewshot:
      datasets:                      # each a {name, train, val} of shard sets as data.train takes them
        - {name: pets, train: /data/pets-shards, val: /data/pets-shards}
      shots: [1, 5, 10, 25]          # images per class the classifier is fitted on
      l2: 1024.0                     # ridge strength (big_vision's 2^10); a list = a grid, chosen per
                                     # (dataset, shots, seed) on `holdout` held-out train images per class
      seeds: 3                       # subsets per shot count; mean and spread are logged
      every: 10000                   # steps; 0 = only at the end (it always runs at the end)
      max_train: null                # use only the first N few-shot train images (shard order)
      max_val: 10000                 # score a fixed random subset of N val images (null: all)

With no ``datasets`` nothing runs. How the metric is computed is :mod:`pretrain.train.fewshot`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pretrain.core.errors import require

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class FewshotDataset:
    """One few-shot task: shots are drawn from ``train`` (its ``train`` split), accuracy is
    measured on ``val`` (its ``val`` split; a folder with one split serves either)."""

    name: str
    train: str
    val: str

    def __post_init__(self):
        require(isinstance(self.name, str) and bool(_NAME.match(self.name)), "fewshot.datasets[].name", self.name,
                "use letters, digits, '_', '-' or '.' (it names the metric fewshot/<name>/<k>shot)")
        for key in ("train", "val"):
            require(bool(getattr(self, key)), f"fewshot.datasets[{self.name}].{key}", getattr(self, key),
                    "give a shard folder, a pattern, a glob or a comma list")


@dataclass(frozen=True)
class FewshotConfig:
    datasets: tuple[FewshotDataset, ...] = ()
    shots: tuple[int, ...] = (1, 5, 10, 25)
    l2: float | tuple[float, ...] = 1024.0
    holdout: int = 10
    seeds: int = 3
    every: int = 0
    max_train: int | None = None
    max_val: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(self.datasets))
        shots = (self.shots,) if isinstance(self.shots, int) else tuple(self.shots)
        require(bool(shots) and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shots),
                "fewshot.shots", list(shots), "give positive integers, e.g. [1, 5, 10, 25]")
        require(len(set(shots)) == len(shots), "fewshot.shots", list(shots), "list each shot count once")
        object.__setattr__(self, "shots", tuple(sorted(shots)))
        grid = self.l2_grid
        require(bool(grid) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in grid),
                "fewshot.l2", self.l2, "give a number > 0 (e.g. 1024.0) or a list of them to choose from")
        names = [d.name for d in self.datasets]
        dup = [n for n in names if names.count(n) > 1]
        require(not dup, "fewshot.datasets", names, f"the name {dup[0] if dup else ''!r} is used twice; "
                "give every dataset its own name")
        require(self.seeds > 0, "fewshot.seeds", self.seeds, "must be >= 1")
        require(self.every >= 0, "fewshot.every", self.every, "must be >= 0 steps (0 = only at the end)")
        require(self.holdout > 0, "fewshot.holdout", self.holdout, "must be >= 1 image per class")
        for key in ("max_train", "max_val"):
            v = getattr(self, key)
            require(v is None or v > 0, f"fewshot.{key}", v, "must be > 0, or null for all images")

    @property
    def l2_grid(self) -> tuple[float, ...]:
        """The l2 values to choose from (one value: no choice, no held-out images needed)."""
        return tuple(float(v) for v in self.l2) if isinstance(self.l2, (tuple, list)) else (float(self.l2),)

    @property
    def choose_l2(self) -> bool:
        return len(self.l2_grid) > 1
