"""Seeds as pure functions of what identifies a draw, not of a generator's history.

A resumed run must draw exactly what the uninterrupted run drew at the same point, whatever else
consumed torch's or Python's global generators in between (a DataLoader drawing its base seed
when it starts, an evaluation, a checkpoint). So every stochastic piece of a training step takes
its seed from :func:`derive_seed` of (purpose, run seed, step, micro batch of the global batch) or,
for a sample's augmentation, of (run seed, epoch, sample key): never of a rank or worker.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 64-bit seed (a valid ``torch.manual_seed`` / ``random.Random`` seed) from ``parts``
    (their ``str``), through sha256: nearby parts give unrelated seeds."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")
