"""How DataLoader workers hand image batches to the rank process: in place, through shared memory.

A plain DataLoader hands over every batch as a new tensor: the worker stacks it into freshly
allocated shared memory, and its file descriptor travels to the rank process through a socket
handshake per tensor. On the 2-core VM of the README's figures that cost ~125 us of worker CPU
per 224 px image for the fresh pages alone, plus ~50 us per image for the transfer on the
receiving side: a sixth of a JPEG decode. Here the rank process makes the batch buffers once
(:class:`SharedBatches`, ``slots`` per worker, in shared memory that workers inherit), a worker
resizes each image straight into its row of the current slot, and what crosses the process
boundary is a :class:`SlotRef`: four small numbers.

Buffers are channels-last (each image's pixels are ``(S, S, 3)``, as the resize writes them), so
batches are uint8 ``(B, 3, S, S)`` tensors with channels-last strides.

A slot is rewritten ``slots`` batches later, and the receiving side copies a batch out of
:meth:`SlotRef.view` before it asks the DataLoader for more than one further batch of that worker
(the training loader copies the rows of each step's pieces into its micro batches: pinned memory
when there is a GPU, so that is the only copy). That order holds because a torch DataLoader serving
in order (the default) asks worker ``w`` for its batch ``k + prefetch_factor`` only after the rank
process has received the worker's batch ``k``, so with ``slots >= prefetch_factor + 2`` a worker
never writes into a batch that has not been copied out.

Memory: ``workers x slots`` batches of shared memory per rank (the training loader uses
``slots = prefetch_factor + 2 = 6``; e.g. 4 workers x 6 x 256 images x 147 KiB = 0.9 GiB at
224 px), against ``workers x prefetch_factor`` batches a plain DataLoader keeps in flight.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

_OPEN: dict[str, SharedBatches] = {}  # the rank process's buffers, by key (SlotRef names them)


class SharedBatches:
    """``workers x slots`` uint8 batch buffers ``(batch, 3, size, size)`` (channels-last) in shared
    memory; make it in the rank process before the DataLoader starts its workers, :meth:`close`
    it when that DataLoader is done. Pages are touched on first use, not here."""

    def __init__(self, workers: int, slots: int, batch: int, size: int):
        self.slots, self.key = slots, uuid.uuid4().hex
        storage = torch.UntypedStorage._new_shared(max(1, workers) * slots * batch * size * size * 3)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.buffer = raw.view(max(1, workers), slots, batch, size, size, 3).permute(0, 1, 2, 5, 3, 4)
        self._written = [0] * max(1, workers)  # counts of the process that writes (one worker each)
        _OPEN[self.key] = self

    def current(self, worker: int) -> torch.Tensor:
        """Worker ``worker``'s slot to fill: ``(batch, 3, S, S)``, rows written in place."""
        return self.buffer[worker, self._written[worker] % self.slots]

    def hand_over(self, worker: int, n: int) -> SlotRef:
        """The first ``n`` rows of the worker's current slot as a reference; the next
        :meth:`current` is the following slot."""
        ref = SlotRef(self.key, worker, self._written[worker] % self.slots, n)
        self._written[worker] += 1
        return ref

    def close(self) -> None:
        _OPEN.pop(self.key, None)


@dataclass(frozen=True)
class SlotRef:
    """A batch in a :class:`SharedBatches` of the rank process: (key, worker, slot, rows)."""

    key: str
    worker: int
    slot: int
    rows: int

    def view(self) -> torch.Tensor:
        """The batch in place (rank process only; rewritten ``slots`` batches later)."""
        return _OPEN[self.key].buffer[self.worker, self.slot, :self.rows]
