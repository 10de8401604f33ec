"""Training samples left out on purpose: the ``dedup.json`` exclusion list beside a set's shards.

``vitscale shards dedup TRAIN --against VAL`` writes ``TRAIN/dedup.json``: the keys of training
images that are near-copies of evaluation images (``{"excluded": [{"key": ..., ...}], ...}``; the
rest of the file says how they were found). The training loader reads the ``dedup.json`` of every
local folder its shards lie in, for every source of a mixture (:func:`with_exclusions`), and asks
:class:`KeyFilter` about every sample it reads: an excluded sample keeps its place in the global
stream like a lost one (its row is filled with the next usable row of its micro batch), so the
data order and resume are those of the set without the file, and it is counted as ``excluded``,
apart from the lost samples (``bad_samples``), since nothing is wrong with it. A key is matched
within the whole training data (sets written by ``shards write`` have unique keys). Evaluation
loaders do not read the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.data.shard_sets import ShardSet
from pretrain.data.shards import is_remote

DEDUP_FILE = "dedup.json"


def read_exclusions(path: Path) -> frozenset[str]:
    """The training keys ``path`` (a ``dedup.json``) excludes; :class:`UserError` if unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
        return frozenset(str(entry["key"]) for entry in doc["excluded"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not an exclusion list vitscale can read ({type(err).__name__}: {err}); write it "
                        f"again with `vitscale shards dedup`, or remove it to train on every sample") from None


def with_exclusions(sets: list[ShardSet]) -> tuple[list[ShardSet], KeyFilter]:
    """The training sources ``sets``, each with a note for the log naming the ``dedup.json`` found
    beside its local shards, and the filter that drops the keys those files list (empty when
    there is none)."""
    keys: set[str] = set()
    out = []
    for shards in sets:
        notes = []
        for folder in dict.fromkeys(Path(url).parent for url in shards.urls if not is_remote(url)):
            path = folder / DEDUP_FILE
            if path.is_file():
                found = read_exclusions(path)
                keys |= found
                notes.append(f"{len(found)} samples excluded by {path} (near-copies of evaluation images)")
        out.append(dataclasses.replace(shards, notes=shards.notes + tuple(notes)) if notes else shards)
    return out, KeyFilter(frozenset(keys))


class KeyFilter:
    """Says whether a sample is excluded and counts those it excluded until :meth:`take`. Each
    loader worker holds its own copy."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys
        self.dropped = 0

    def drops(self, key: str) -> bool:
        """Whether the sample with ``key`` is left out (then counted)."""
        if key in self.keys:
            self.dropped += 1
            return True
        return False

    def take(self) -> int:
        """Samples left out since the last call."""
        n, self.dropped = self.dropped, 0
        return n
