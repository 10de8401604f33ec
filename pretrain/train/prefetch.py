"""Hold the next micro batch on its way to the device while the current step runs.

On a GPU the loader's uint8 batches arrive in pinned memory; :class:`DevicePrefetcher` starts the
copy of batch k+1 on a side CUDA stream as soon as batch k is handed to the step, so the copy
overlaps the step's compute and the step only waits on an event. Off the GPU the same code runs
without a stream (the copy is then a no-op).

Exact resume: the prefetcher holds one batch the model has not consumed, so its ``state_dict``
is the loader's state from *before* that batch was taken: a checkpoint never counts the batch in
flight, and a resumed run reads it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from pretrain.data.batch import Batch
from pretrain.data.config import LoaderSpec
from pretrain.data.pipeline import build_train_data


def train_source(spec: LoaderSpec, rank: int, world: int, device: torch.device,
                 interrupted: Callable[[], bool] | None = None):
    """Where a training rank takes its micro batches: the ``data.train`` source
    (:func:`pretrain.data.pipeline.build_train_data`), whose waits for data also end when
    ``interrupted()`` says so, held one batch ahead on the device when that is a GPU
    (:class:`DevicePrefetcher`). The trainer and ``vitscale bench train`` both read through here."""
    source = build_train_data(spec, rank, world)
    if interrupted is not None:
        source.interrupted = interrupted
    return DevicePrefetcher(source, device) if torch.device(device).type == "cuda" else source


class DevicePrefetcher:
    """A train source (``next_batch``, ``state_dict``, ``load_state_dict``, ``stats``,
    ``problem``, ``close``) wrapping another, one batch ahead, images already on ``device``."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead: Batch | None = None
        self.ready: torch.cuda.Event | None = None
        self.state_before_ahead: dict | None = None

    def _take(self) -> None:
        self.state_before_ahead = self.source.state_dict()
        batch = self.source.next_batch()
        if self.stream is None:
            self.ahead = replace(batch, images=batch.images.to(self.device))
            return
        with torch.cuda.stream(self.stream):
            images = batch.images.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)
        self.ahead = replace(batch, images=images)

    def next_batch(self) -> Batch:
        if self.ahead is None:
            self._take()
        batch, ready = self.ahead, self.ready
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            batch.images.record_stream(torch.cuda.current_stream(self.device))
        self._take()
        return batch

    def state_dict(self) -> dict:
        return self.source.state_dict() if self.ahead is None else self.state_before_ahead

    def load_state_dict(self, state: dict) -> None:
        self.ahead = self.ready = None
        self.source.load_state_dict(state)

    @property
    def placement(self) -> str:
        return self.source.placement

    def reshard(self, parts: list[dict]) -> None:
        self.ahead = self.ready = None
        self.source.reshard(parts)

    def stats(self) -> dict:
        return self.source.stats()

    def problem(self) -> str | None:
        return self.source.problem()

    def close(self) -> None:
        self.ahead = None
        self.source.close()

    @property
    def shards(self):
        return getattr(self.source, "shards", None)
