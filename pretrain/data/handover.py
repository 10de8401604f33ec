"""How a DataLoader worker hands image batches to the rank process: reused shared memory.

The default hand-over stacks every batch into freshly allocated shared memory. Touching fresh
pages costs more than copying into warm ones: on the 2-core VM of the README's figures a fresh
(64, 3, 224, 224) uint8 batch cost ~125 us of worker CPU per image, an eighth of a JPEG decode,
against ~17 us per image for the same stack into memory used before. So each worker keeps a
few batch buffers in shared memory (:class:`BatchSlots`) and stacks batch ``k`` into slot
``k % slots``; the tensor it yields is pickled as a handle to that memory (no copy).

A slot is rewritten ``slots`` batches later, and the receiving side copies a batch out before
then: DataLoader's pin-memory thread pins (copies) each batch on arrival, and without pinning
:func:`receive` clones it. That order holds because a torch DataLoader serving in order (the
default) asks worker ``w`` for its batch ``k + prefetch_factor`` only after the rank process has
received the worker's batch ``k`` (and batches are pinned in arrival order), so with
``slots >= prefetch_factor + 2`` a worker never writes into a batch not yet copied out.
"""

from __future__ import annotations

import torch


class BatchSlots:
    """A worker's ``slots`` reused shared-memory batch buffers, uint8 ``(batch, 3, S, S)`` in
    channels-last memory (each image's pixels are ``(S, S, 3)``, as the resize writes them).

    Fill rows of :meth:`current` in place, then :meth:`hand_over` the first ``n`` rows, which moves
    on to the next slot; a handed-over batch is rewritten ``slots`` batches later."""

    def __init__(self, slots: int, batch: int, size: int):
        self.slots, self.batch, self.size = slots, batch, size
        self._buffers: list[torch.Tensor] = []
        self._count = 0

    def current(self) -> torch.Tensor:
        i = self._count % self.slots
        if i == len(self._buffers):
            raw = torch.empty(self.batch, self.size, self.size, 3, dtype=torch.uint8).share_memory_()
            self._buffers.append(raw.permute(0, 3, 1, 2))  # (B, 3, S, S), channels-last strides
        return self._buffers[i]

    def hand_over(self, n: int) -> torch.Tensor:
        """The first ``n`` rows of the current slot; the next :meth:`current` is another slot."""
        out = self.current()[:n]
        self._count += 1
        return out

    def stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``images`` (3, S, S) copied into the current slot and handed over."""
        rows = self.current()
        for i, img in enumerate(images):
            rows[i].copy_(img)
        return self.hand_over(len(images))


def receive(images: torch.Tensor) -> torch.Tensor:
    """A batch from :meth:`BatchSlots.stack` as the rank process may keep it: pinned batches are
    copies already, others are cloned out of the worker's slot."""
    return images if images.is_pinned() else images.clone()
