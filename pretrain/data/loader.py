"""Streaming WebDataset input for training and evaluation, with exact and elastic resume.

Training reads the global sample stream of :mod:`pretrain.data.stream`: rank ``r`` owns a fixed
block of its streams and its micro batches are fixed slices of each global batch, whatever the
number of ranks and workers. Each rank runs a torch DataLoader whose workers each own some of the
rank's streams (worker ``w`` of ``W``: the rank's streams ``w, w + W, ...``); per step every
worker decodes and augments its streams' ``R`` items on the CPU and hands over one *piece*
(uint8 images written in place into batch buffers the rank shares with its workers,
:mod:`pretrain.data.handover`); the rank puts the pieces in canonical order and cuts them into
micro batches, which cross to the device as uint8 (a quarter of float32's bytes) and are
normalised there by the engine. The pieces of a step come one per worker, in worker order, so
what a rank delivers never depends on timing.

Resume: the state is the number of rows (whole steps) consumed plus, inside a step, the micro
batches already delivered. A resumed rank restarts each of its streams there, on any world size
or worker count: nothing is repeated or skipped (``reshard`` gathers the old ranks' states).

Augmentation (the pipeline of :mod:`pretrain.data.ops`: crop, flip, then pixel operations such
as RandAugment) is seeded per sample by (seed, epoch, sample key): the same sample gets the same
pixels whatever the number of ranks and workers, before or after a resume.

``data.decode=gpu`` (:mod:`pretrain.data.device_decode`): workers draw the same crop boxes and flips
from the same seeds but hand over the encoded JPEGs; the rank process decodes each piece with
nvJPEG and crops and resizes on its device, so batches arrive as uint8 on the device. RandAugment
runs in the workers, so it needs ``data.decode=cpu``.

Unusable samples keep their place in the stream and are counted by reason and shard
(``undecodable``, ``missing_image``, ``missing_label``, ``bad_label``, ``label_out_of_range``;
``truncated_shard``, ``missing_shard`` and ``unreachable`` for what damaged or unreachable shards
lost); their rows are filled with the next usable row of the same micro batch, so batches stay
full. The counts are part of the loader state, so they add up over resumes. ``problem()``
reports when their share exceeds ``data.max_bad_frac``. Samples the set's ``dedup.json`` excludes
(near-copies of evaluation images, :mod:`pretrain.data.exclusions`) keep their place and are filled
the same way, but are counted apart, as ``excluded``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pretrain.core.errors import UserError, config_error
from pretrain.data.batch import Batch
from pretrain.data.config import LoaderSpec, train_sources
from pretrain.data.device_decode import decode_packed, pack, plan_eval, plan_train
from pretrain.data.exclusions import KeyFilter, with_exclusions
from pretrain.data.handover import SharedBatches
from pretrain.data.shard_sets import ShardSet, resolve_shards
from pretrain.data.shards import SampleError, TarSample, decode_label, image_bytes
from pretrain.data.stream import (
    Hole,
    Mixture,
    StreamItem,
    Streams,
    auto_streams,
    mixture_columns,
    read_shard,
    seeded,
    split_streams,
)
from pretrain.data.transforms import eval_transform, train_transform
from pretrain.data.workers import worker_options

_MIN_SEEN_FOR_BAD_CHECK = 100
_PREFETCH = 4  # batches in flight per worker
_POLL_S = 1.0  # how often a rank waiting for a batch looks at the stop flag and the stall clock
_STOP_GRACE_S = 10.0  # a stop signal while no batch comes: how long the batch still may take


def sample_target(sample: TarSample, num_classes: int, multi_label: bool,
                  label_key: str | None = None) -> torch.Tensor:
    """Class index (int64 scalar), or a multi-hot float row for multi-label data."""
    value = decode_label(sample.files, num_classes, multi_label, label_key)
    if multi_label:
        return torch.zeros(num_classes).index_fill_(0, torch.tensor(value), 1.0)
    return torch.tensor(value)


def bad_reason(err: Exception) -> str:
    return err.reason if isinstance(err, SampleError) else "undecodable"


def add_counts(into: dict, counts: dict) -> dict:
    """Add ``counts`` (lost samples keyed by ``(reason, shard)``, or by either) into ``into``."""
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n
    return into


def sum_counts(parts: list[dict]) -> dict:
    """Counts of several ranks (or records) added up."""
    out: dict = {}
    for part in parts:
        add_counts(out, part)
    return out


def counts_by(counts: dict, field: int) -> dict[str, int]:
    """``(reason, shard)`` counts summed by reason (``field`` 0) or by shard (1)."""
    return sum_counts([{key[field]: n} for key, n in counts.items()])


def decode_device(spec: LoaderSpec) -> torch.device | None:
    """Where batches are decoded with ``data.decode=gpu`` (None: in the workers, on the CPU)."""
    if spec.data.decode != "gpu":
        return None
    device = torch.device(spec.decode_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        config_error("data.decode", "gpu", "this process sees no CUDA device; use data.decode=cpu")
    return device


def collate(images: list, size: int, gpu: bool):
    """A worker's batch of eval images: stacked in shared memory, or packed encoded JPEGs (gpu)."""
    return pack(images, size) if gpu else default_collate(images)


def decode_batch(b: dict, device: torch.device | None, bad: dict) -> tuple[torch.Tensor, list[int]]:
    """The images of worker batch ``b`` as a tensor, decoded on ``device`` when they arrive
    packed, and the rows no decoder could read (added to ``bad`` as ``undecodable``)."""
    if not isinstance(b["images"], dict):
        return b["images"], []
    out, failed = decode_packed(b["images"], b["images"]["pixels"].shape[-1], device)
    for i in failed:
        add_counts(bad, {("undecodable", b["shards"][i]): 1})
    return out, failed


class _TrainStreams(IterableDataset):
    """Yields, for each step, one *piece* per worker: the ``R`` items of each of the worker's
    streams, decoded (uint8 rows in the shared batch buffers; holes left unwritten), with
    targets, keys (None for holes), the streams' positions after the piece and lost-sample
    counts."""

    def __init__(self, plan: Mixture, spec: LoaderSpec, columns: list[list[int]], starts: dict[int, tuple[int, int]],
                 buffers: SharedBatches | None, exclusion: KeyFilter):
        self.plan, self.spec, self.columns, self.starts, self.buffers = plan, spec, columns, starts, buffers
        self.exclusion = exclusion  # the keys of the set's dedup.json: holes counted as "excluded"

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        row = info.id if info is not None else 0
        try:
            yield from self._pieces(row)
        except UserError as err:  # handed to the rank as it is (a worker's exception would carry a traceback)
            yield {"error": str(err)}

    def _pieces(self, row: int) -> Iterator[dict]:
        torch.set_num_threads(1)
        spec, d, pipeline, plan = self.spec, self.spec.data, self.spec.pipeline, self.plan
        gpu, buffers, cols = d.decode == "gpu", self.buffers, self.columns[row]
        crop = {"scale": pipeline.crop_scale, "hflip": pipeline.hflip}
        streams = {c: plan.items(c, self.starts[c], d.shuffle_buffer, spec.retry) for c in cols}
        usable = {c: [None, 0, "", {}] for c in cols}  # per stream: epoch, usable samples, an example problem, losses
        while True:
            bad: dict = {}
            images, targets, keys, shards, pos = [], [], [], [], {}
            out = None if gpu else buffers.current(row)
            for c in cols:
                for _ in range(plan.rows):
                    item = next(streams[c])
                    _check_usable(usable[c], item.epoch, plan, c)
                    if self.exclusion.drops(item.unit.key):  # keeps its row, filled like a hole's
                        images.append(None)
                        targets.append(None)
                        keys.append(None)
                        continue
                    img, target, problem = _decode(item, spec, out, len(images), crop, gpu)
                    if problem is not None:
                        reason, shard, example = problem
                        add_counts(bad, {(reason, shard): 1})
                        add_counts(usable[c][3], {reason: 1})
                        usable[c][2] = usable[c][2] or example
                    else:
                        usable[c][1] += 1
                    images.append(img)
                    targets.append(target)
                    keys.append(None if problem else item.unit.key)
                    if problem is None:
                        shards.append(item.unit.shard)  # of the usable rows, as packed (decode_batch names them)
                pos[c] = (item.epoch, item.index + 1)
            batch = pack([i for i in images if i is not None], spec.img_size) if gpu \
                else buffers.hand_over(row, len(images))
            yield {"images": batch, "targets": _stack_targets(targets, spec), "keys": keys, "shards": shards,
                   "pos": pos, "epoch": max(e for e, _ in pos.values()), "bad": bad,
                   "excluded": self.exclusion.take()}


def _decode(item: StreamItem, spec: LoaderSpec, out: torch.Tensor | None, at: int, crop: dict, gpu: bool):
    """(image, target, problem) of one stream item: the image written into ``out[at]`` (CPU; None
    returned) or its encoded plan (gpu); ``problem`` is (reason, shard, example) for a hole or an
    unusable sample, else None."""
    unit = item.unit
    if isinstance(unit, Hole):
        return None, None, (unit.reason, unit.shard, f"a sample lost in {unit.shard} ({unit.reason})")
    d = spec.data
    try:
        target = sample_target(unit, spec.num_classes, d.multi_label, d.label_key)
        rng = seeded("aug", spec.seed, item.epoch, unit.key)
        data = image_bytes(unit)
        if gpu:
            return plan_train(data, spec.img_size, rng, **crop), target, None
        img = train_transform(data, spec.img_size, rng, **crop, out=out[at])
        spec.pipeline.apply_pixel(img, rng)
        return None, target, None
    except Exception as err:  # any unusable sample is skipped and counted, never fatal
        return None, None, (bad_reason(err), unit.shard, f"{unit.key} in {unit.shard}: {err}")


def _stack_targets(targets: list, spec: LoaderSpec):
    """A piece's targets as one array (rows of holes zero; they are replaced on the rank)."""
    if spec.data.multi_label:
        zero = torch.zeros(spec.num_classes)
        return torch.stack([zero if t is None else t for t in targets])
    return np.array([0 if t is None else int(t) for t in targets], dtype=np.int64)


def _check_usable(state: list, epoch: int, plan: Mixture, c: int) -> None:
    """Stops the run when a stream went through a whole epoch without one usable sample
    (``state``: the stream's epoch, usable samples, an example problem, losses by reason)."""
    if state[0] is not None and epoch != state[0] and state[1] == 0:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(state[3].items()))
        names = plan.shard_names(state[0], c)
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UserError(f"data.train: stream {c} found no usable sample in a whole epoch of its shards {listed} "
                        f"({why or 'no samples'}; e.g. {state[2] or 'none'}); check them with `vitscale shards "
                        f"verify`, or set data.label_key if the label is in another .json field")
    if epoch != state[0]:
        state[0], state[1], state[3] = epoch, 0, {}


class ShardTrain:
    """The training source over WebDataset shards (see :mod:`pretrain.data.stream` for the order
    and the module docstring for the rest).

    ``next_batch()`` gives this rank's micro batches in order: its share of each global batch is
    assembled from its workers' pieces, a lost or unusable sample's row is filled with the next
    usable row of the same micro batch (so every micro batch is full and the key *set* of each
    global batch is the same on every layout), and split into ``A`` micro batches.

    No wait is unbounded: a rank that gets no batch for ``data.stall_timeout_s`` stops with a
    :class:`UserError` naming its streams, their shards and the last key it delivered; while a batch
    is awaited the rank looks at ``interrupted()`` (set by the trainer to its stop flag) every
    second, and a stop signal that finds it waiting more than ``_STOP_GRACE_S`` ends the wait
    with a :class:`UserError` too (the latest checkpoint stays; nothing half-done is saved)."""

    interrupted: Callable[[], bool] = staticmethod(lambda: False)
    placement = "sharded"  # rows consumed (the same on every rank) + this rank's streams; see reshard()

    def __init__(self, spec: LoaderSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        sources = train_shard_sets(spec)
        sets, self.exclusion = with_exclusions([shards for _, _, shards in sources])  # dedup.json beside them
        self.sources = [(name, weight, shards) for (name, weight, _), shards in zip(sources, sets, strict=True)]
        self.shards = self.sources[0][2]
        self.accum = spec.grad_accum
        self.device = decode_device(spec)
        self._layout(plan_streams(self.sources, spec, world))
        self.steps = 0  # whole steps delivered
        self.micro = 0  # micro batches of the current step delivered
        self.positions = self._positions_at(0)
        self.epoch = 0
        self.bad: dict = {}
        self.seen = 0
        self.excluded = 0  # samples dropped by dedup.json (not lost: not in self.bad)
        self.last_key = "none yet"
        self._queue: list[Batch] = []
        self._got: list[dict] = []
        self._spare: tuple | None = None  # (image, target, key) of the last usable sample delivered
        self._step_positions: dict[int, tuple[int, int]] = dict(self.positions)
        self._it = None
        self._buffers: SharedBatches | None = None

    def _layout(self, plan: Mixture) -> None:
        """Take ``plan``'s streams: this rank's block of them, and which worker reads which."""
        self.plan = plan
        per_rank = plan.count // self.world
        self.columns = list(range(self.rank * per_rank, (self.rank + 1) * per_rank))
        self.workers = max(1, min(max(1, self.spec.data.workers), per_rank))
        self._pieces = [self.columns[w::self.workers] for w in range(self.workers)]

    def _positions_at(self, steps: int) -> dict[int, tuple[int, int]]:
        return {c: self.plan.start(c, steps * self.plan.rows) or (0, 0) for c in self.columns}

    def _start(self) -> None:
        self.close()
        n = self.spec.workers and self.workers  # 0: one reader in this process
        piece = self.plan.rows * -(-len(self.columns) // self.workers)
        if self.device is None:  # CPU decoding: batch buffers the workers fill in place
            self._buffers = SharedBatches(self.workers, _PREFETCH + 2, piece, self.spec.img_size)
        self.spec.pipeline.prepare()  # imports (torchvision) before the workers fork
        ds = _TrainStreams(self.plan, self.spec, self._pieces, dict(self.positions), self._buffers, self.exclusion)
        # no pin-memory thread: the rank copies each piece's rows once, straight into a pinned micro batch
        loader = DataLoader(ds, batch_size=None, pin_memory=False, prefetch_factor=_PREFETCH if n else None,
                            persistent_workers=False, timeout=_POLL_S if n else 0, **worker_options(n))
        self._it = iter(loader)

    def _next(self) -> dict:
        """The next worker piece, waiting in polls of ``_POLL_S`` (see the class docstring)."""
        if self.spec.workers == 0:
            return next(self._it)
        t0, signalled, note_at = time.monotonic(), None, 60.0
        while True:
            try:
                return next(self._it)
            except RuntimeError as err:
                if "timed out" not in str(err):
                    raise
            now = time.monotonic()
            if signalled is None and self.interrupted():
                signalled = now
            if signalled is not None and now - signalled > _STOP_GRACE_S:
                self._abandon()
                raise UserError(f"stop signal received while rank {self.rank} waited {now - t0:.0f} s for a batch "
                                f"from {self._streams_line()}: exiting without a save (the latest checkpoint stays)")
            if now - t0 > self.spec.data.stall_timeout_s:
                self._abandon()
                raise UserError(f"rank {self.rank} got no batch for {now - t0:.0f} s (data.stall_timeout_s="
                                f"{self.spec.data.stall_timeout_s:g}) from {self._streams_line()}; check that "
                                f"storage, or raise data.stall_timeout_s")
            if now - t0 > note_at:
                note_at += 60.0
                print(f"data: rank {self.rank} has waited {now - t0:.0f} s for a batch from {self._streams_line()}",
                      file=sys.stderr, flush=True)

    def _streams_line(self) -> str:
        """The streams the next piece comes from, their shards now and the last key delivered."""
        cols = self._pieces[len(self._got) % self.workers]
        names = [n for c in cols for n in self.plan.shard_names(self.positions[c][0], c)]
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"streams {', '.join(map(str, cols))} (shards {listed}; last key {self.last_key})"

    def _assemble(self) -> list[Batch]:
        """This rank's share of the next global batch, as ``A`` micro batches."""
        if self._it is None:
            self._start()
        self._got: list[dict] = []
        while len(self._got) < self.workers:
            b = self._next()
            if "error" in b:
                self.close()
                raise UserError(b["error"])
            self._got.append(b)
        rows = self.plan.rows
        parts, keys, targets, order = [], [], [], []
        for b in self._got:
            add_counts(self.bad, b["bad"])
            self.excluded += b["excluded"]
            if self.device is not None:  # packed usable rows, decoded here
                images, failed = decode_batch(b, self.device, self.bad)
                parts.append((images, _rows_of_valid(b["keys"], failed)))
            else:  # every row in place, in the shared buffer (copied out below, before it is rewritten)
                images = b["images"].view()
                parts.append((images, list(range(len(b["keys"])))))
            self.positions.update(b["pos"])
            self.epoch = max(self.epoch, b["epoch"])
        for k in range(len(self.columns)):  # column by column: worker k % W holds the k-th as its (k // W)-th
            w, j = k % self.workers, k // self.workers
            b, (_, where) = self._got[w], parts[w]
            for r in range(j * rows, (j + 1) * rows):
                order.append((w, r))
                keys.append(b["keys"][r] if b["keys"][r] is not None and where[r] is not None else None)
                targets.append(b["targets"][r])
        self.seen += len(order)
        return self._micro_batches(parts, order, keys, targets)

    def _micro_batches(self, parts, order, keys, targets) -> list[Batch]:
        """Rows ``order`` ((piece, row) in canonical order) split into micro batches; a row without
        a usable image takes the next usable row of its micro batch (cyclically), and a micro batch
        without any the rank's last usable sample."""
        micro, size = self.spec.micro_batch, self.spec.img_size
        batches = []
        for i in range(self.accum):
            rows = range(i * micro, (i + 1) * micro)
            good = [r for r in rows if keys[r] is not None]
            first = parts[0][0]
            if first.device.type == "cpu":  # channels-last rows: (S, S, 3) each, copied as runs of whole rows
                hwc = torch.empty((micro, size, size, 3), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                images = hwc.permute(0, 3, 1, 2)
            else:
                images = torch.empty((micro, 3, size, size), dtype=torch.uint8, device=first.device)
            if not good:  # not one usable sample in it: the rank's last usable one fills it
                if self._spare is None:
                    raise UserError(f"rank {self.rank}: no usable sample in its first micro batch from "
                                    f"{self._streams_line()}; check the shards with `vitscale shards verify`")
                image, target, key = self._spare
                images.copy_(image.to(images.device).expand_as(images))
                batches.append(Batch(images, _targets([target] * micro, self.spec), [key] * micro))
                continue
            fill = [r if keys[r] is not None else next((g for g in good if g > r), good[0]) for r in rows]
            sources = [(order[r][0], parts[order[r][0]][1][order[r][1]]) for r in fill]  # (piece, row in it)
            j = 0
            while j < micro:  # each run of consecutive rows of one piece is one copy
                w, at = sources[j]
                n = 1
                while j + n < micro and sources[j + n] == (w, at + n):
                    n += 1
                src = parts[w][0]
                if first.device.type == "cpu":
                    hwc[j:j + n].copy_(src[at:at + n].permute(0, 2, 3, 1))
                else:
                    images[j:j + n].copy_(src[at:at + n])
                j += n
            batch = Batch(images, _targets([targets[r] for r in fill], self.spec), [keys[r] for r in fill])
            self._spare = (images[-1:].clone(), targets[fill[-1]], keys[fill[-1]])
            batches.append(batch)
        return batches

    def next_batch(self) -> Batch:
        if not self._queue:
            self._step_positions = dict(self.positions)
            self._queue = self._assemble()
            for _ in range(self.micro):  # a resume inside a step: those micro batches were delivered
                self._queue.pop(0)
        batch = self._queue.pop(0)
        self.micro += 1
        if not self._queue:
            self.steps, self.micro = self.steps + 1, 0
        self.last_key = batch.keys[-1]
        return batch

    def state_dict(self) -> dict:
        """Rows consumed (whole steps), micro batches of the current step delivered, this rank's
        streams' (epoch, item) at the start of that step, and the lost-sample counts."""
        start = self._step_positions if self.micro else self.positions
        return {"kind": "streams", "streams": self.plan.count, "rows": self.steps * self.plan.rows,
                "micro": self.micro, "epoch": self.epoch, "world": self.world, "workers": self.workers,
                "global_samples": self.steps * self.plan.rows * self.plan.count,
                "positions": [[c, e, t] for c, (e, t) in sorted(start.items())],
                "seen": self.seen, "excluded": self.excluded,
                "bad": [[reason, shard, n] for (reason, shard), n in sorted(self.bad.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.bad = {(reason, shard): int(n) for reason, shard, n in state.get("bad", [])}
        self.seen = int(state.get("seen", 0))
        self.excluded = int(state.get("excluded", 0))
        self.epoch = int(state.get("epoch", 0))
        if state.get("kind") in ("streams", "resharded"):
            if int(state["streams"]) != self.plan.count:  # the checkpoint's order goes on (data.streams unset)
                if self.spec.data.streams is not None:
                    raise UserError(f"the checkpoint's data order has data.streams={state['streams']} but this "
                                    f"run sets {self.spec.data.streams}: drop the key to continue that order")
                self._layout(plan_streams(self.sources, dataclasses.replace(
                    self.spec, data=dataclasses.replace(self.spec.data, streams=int(state["streams"]))), self.world))
            self.steps = int(state["rows"]) // self.plan.rows
            self.micro = int(state.get("micro", 0))
            saved = {int(c): (int(e), int(t)) for c, e, t in state.get("positions", [])}
        else:  # a checkpoint from before the global stream: continue at the same number of samples
            self.steps = int(state.get("global_samples", 0)) // (self.plan.rows * self.plan.count)
            self.micro, saved = 0, {}
        self.positions = self._positions_at(self.steps)
        uncounted = [c for c in self.columns if self.plan.start(c, 0) is None]
        missing = [c for c in uncounted if c not in saved]
        if missing:
            raise UserError(f"the checkpoint holds no position for streams {missing[:5]} of data.train (a set "
                            f"without per-shard counts); index it with `vitscale shards index` to resume on "
                            f"another layout")
        self.positions.update({c: saved[c] for c in uncounted})
        self._step_positions = dict(self.positions)
        self._queue = []
        self.close()

    def reshard(self, parts: list[dict]) -> None:
        """Continue after a checkpoint of another world size (``parts``: every old rank's state):
        the rows consumed are the same on every old rank; stream positions are gathered from the
        rank that owned each stream; the old ranks' lost-sample counts are summed into rank 0's,
        so the totals stay whole."""
        if any(int(p.get("micro", 0)) for p in parts):
            raise UserError("the checkpoint was taken inside a step; resume it on its own world size")
        state = {**parts[0], "kind": parts[0].get("kind", "shards"),
                 "positions": [pos for part in parts for pos in part.get("positions", [])]}
        if self.rank == 0:
            bad: dict = {}
            for part in parts:
                add_counts(bad, {(reason, shard): int(n) for reason, shard, n in part.get("bad", [])})
            state.update(bad=[[r, s, n] for (r, s), n in sorted(bad.items())],
                         seen=sum(int(part.get("seen", 0)) for part in parts),
                         excluded=sum(int(part.get("excluded", 0)) for part in parts))
        else:
            state.update(bad=[], seen=0, excluded=0)
        self.load_state_dict(state)

    def describe(self) -> list[str]:
        """Console lines: each source's shards and samples, and the streams (with a mixture, each
        source's exact share of every batch)."""
        lines, weights = [], self.plan.weights()
        for name, _, shards in self.sources:
            count = f"{shards.samples} samples" if shards.samples is not None and not shards.estimated \
                else "samples unknown"
            key = "data.train" if len(self.sources) == 1 else f"data.train {name} ({100 * weights[name]:.1f}% of " \
                f"every batch)"
            lines.append("; ".join([f"{key}: {len(shards.urls)} shards, {count}", *shards.notes]))
        lines.append(f"data order: {self.plan.count} streams (data.streams) of {self.plan.rows} samples a step, "
                     f"{len(self.columns)} on each of {self.world} ranks, read by {self.workers} "
                     f"worker{'s' if self.workers > 1 else ''} per rank")
        return lines

    def stats(self) -> dict:
        """This rank's bad-sample counts so far: total, by reason and by shard, its samples excluded
        by dedup.json, and for a mixture the samples each source gave in whole steps (the loop sums
        them over ranks)."""
        out = {"epoch": self.epoch, "bad_samples": sum(self.bad.values()), "bad_by_reason": counts_by(self.bad, 0),
               "bad_by_shard": counts_by(self.bad, 1), "samples_seen": self.seen, "excluded": self.excluded}
        if len(self.sources) > 1:  # this rank's rows of each source (the loop sums them over ranks)
            out["samples_by_source"] = sum_counts([{self.plan.source_of(c): self.steps * self.plan.rows}
                                                   for c in self.columns])
        return out

    def problem(self) -> str | None:
        total = sum(self.bad.values())
        if self.seen < _MIN_SEEN_FOR_BAD_CHECK or total <= self.spec.data.max_bad_frac * self.seen:
            return None
        worst = sorted(self.bad.items(), key=lambda kv: -kv[1])[:5]
        named = ", ".join(f"{shard} ({reason}: {n})" for (reason, shard), n in worst)
        return (f"{total} of {self.seen} training samples on rank {self.rank} were unusable "
                f"({100 * total / self.seen:.1f}% > data.max_bad_frac={self.spec.data.max_bad_frac}); worst "
                f"shards: {named}. Check them with `vitscale shards verify`, or raise data.max_bad_frac")

    def close(self) -> None:
        self._it = None  # its workers are joined here, before their buffers are let go
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None

    def _abandon(self) -> None:
        """Close, killing the reader processes first: this rank gives up on them (a stall, or a
        stop signal while no batch comes), and they are stuck in reads that may not end for
        ``data.read_timeout_s``; the DataLoader's own shutdown would wait 5 s for each."""
        it = self._it
        if getattr(it, "_worker_pids_set", False):  # torch's iterator (private): unwatch, then kill
            from torch.utils.data._utils.signal_handling import _remove_worker_pids

            _remove_worker_pids(id(it))  # else its SIGCHLD handler reports the kill as a worker failure
            it._worker_pids_set = False
            for worker in it._workers:
                if worker.is_alive():
                    worker.kill()
        self.close()


def _targets(rows: list, spec: LoaderSpec) -> torch.Tensor:
    """A micro batch's targets: class indices, or multi-hot rows."""
    if spec.data.multi_label:
        return torch.stack([torch.as_tensor(t) for t in rows])
    return torch.as_tensor(np.array(rows, dtype=np.int64))


def _rows_of_valid(keys: list, failed: list[int]) -> list[int | None]:
    """For each row of a piece, its row among the piece's decoded images (None: a hole, or a
    row the device could not decode). CPU pieces keep every row in place; packed (gpu) pieces
    hold only the usable ones, in order."""
    out, at, failed = [], 0, set(failed)
    for key in keys:
        if key is None:
            out.append(None)
            continue
        out.append(None if at in failed else at)
        at += 1
    return out


def plan_streams(sources: list[tuple[str, float, ShardSet]], spec: LoaderSpec, world: int) -> Mixture:
    """The global streams of this run over ``sources`` ((name, weight, shards) of ``data.train``),
    checked against the layout: ``data.streams`` (or :func:`auto_streams`) must divide the global
    batch, the world must divide it, and a source without counts needs a shard per stream."""
    d = spec.data
    global_batch = spec.micro_batch * spec.grad_accum * world
    shards = sum(len(s.urls) for _, _, s in sources)
    count = d.streams or auto_streams(global_batch, shards, world)
    if global_batch % count:
        raise UserError(f"data.streams={count} does not divide train.global_batch={global_batch}: set data.streams "
                        f"to a divisor of it (e.g. {auto_streams(global_batch, shards, world)})")
    if count % world:
        raise UserError(f"data.streams={count} is not a multiple of the {world} ranks (each rank reads whole "
                        f"streams): set data.streams={auto_streams(global_batch, shards, world)}, or run "
                        f"on a number of ranks that divides {count}")
    names = [name for name, _, _ in sources]
    counts = split_streams(count, [w for _, w, _ in sources], names) if len(sources) > 1 else [count]
    plans = []
    for i, ((name, _, s), n) in enumerate(zip(sources, counts, strict=True)):
        where = "data.train" if len(sources) == 1 else f"data.train source {name}"
        if (s.counts is None or s.estimated) and len(s.urls) < n:
            raise UserError(f"{where} has {len(s.urls)} shards and no per-shard counts, but {n} streams need a shard "
                            f"each: lower data.streams, or index the set (`vitscale shards index`)")
        if s.counts is not None and not s.estimated and sum(s.counts) < n:
            raise UserError(f"{where} holds {sum(s.counts)} samples, fewer than its {n} streams")
        plans.append(Streams(s, spec.seed + 7919 * i, n, global_batch // count))
    return Mixture(tuple(plans), tuple(names), mixture_columns(counts), global_batch // count)


def train_shard_sets(spec: LoaderSpec) -> list[tuple[str, float, ShardSet]]:
    """(name, weight, shard set) of every source of ``data.train``, resolved and label-checked."""
    d = spec.data
    sources = train_sources(d)
    out = []
    for src in sources:
        key = "data.train" if len(sources) == 1 else f"data.train source {src.source}"
        shards = resolve_shards(src.source, "train", key=key, samples_per_epoch=d.samples_per_epoch)
        check_labels(shards, spec, key)
        out.append((src.source, src.weight, shards))
    return out


def check_labels(shards: ShardSet, spec: LoaderSpec, key: str) -> None:
    """The shards' label kind and class count (known from an index) fit the run."""
    d = spec.data
    if shards.multi_label is not None and shards.multi_label != d.multi_label:
        kind = "multi-label" if shards.multi_label else "single-label"
        raise UserError(f"{key}: the shards are {kind} but data.multi_label={d.multi_label}: set "
                        f"data.multi_label={str(shards.multi_label).lower()}"
                        + (" and train.loss=sigmoid" if shards.multi_label else ""))
    if shards.num_classes is not None and shards.num_classes > spec.num_classes:
        raise UserError(f"{key}: the shards hold {shards.num_classes} classes but model.num_classes="
                        f"{spec.num_classes}: set model.num_classes={shards.num_classes}")


class _EvalShards(IterableDataset):
    def __init__(self, shards: ShardSet, spec: LoaderSpec, mine: list[int], workers: int):
        self.shards, self.spec, self.mine, self.workers = shards, spec, mine, workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        torch.set_num_threads(1)
        spec = self.spec
        gpu = spec.data.decode == "gpu"
        transform = plan_eval if gpu else eval_transform
        images, targets, shards = [], [], []
        bad: dict = {}
        counts = self.shards.counts
        for i in self.mine[w::self.workers]:
            for sample in read_shard(self.shards.urls[i], counts[i] if counts else None, bad, spec.retry):
                try:
                    target = sample_target(sample, spec.num_classes, spec.data.multi_label, spec.data.label_key)
                    img = transform(image_bytes(sample), spec.img_size, spec.data.eval_crop_pct)
                except Exception as err:  # counted, and reported as missing from the eval set
                    key = (bad_reason(err), sample.shard)
                    bad[key] = bad.get(key, 0) + 1
                    continue
                images.append(img)
                targets.append(target)
                shards.append(sample.shard)
                if len(images) == spec.micro_batch:
                    yield {**_pad(images, targets, spec, gpu), "shards": shards, "bad": dict(bad)}
                    images, targets, shards = [], [], []
                    bad.clear()  # read_shard adds to this very dict
        if images:
            yield {**_pad(images, targets, spec, gpu), "shards": shards, "bad": dict(bad)}
        elif bad:
            yield {"images": None, "bad": dict(bad)}


def _pad(images: list, targets: list, spec: LoaderSpec, gpu: bool) -> dict:
    """Targets and validity padded to a micro batch; images too, or (gpu) packed unpadded."""
    n, micro = len(images), spec.micro_batch
    imgs = collate(images if gpu else images + [torch.zeros_like(images[0])] * (micro - n), spec.img_size, gpu)
    tgts = torch.stack(targets + [torch.zeros_like(targets[0])] * (micro - n))
    return {"images": imgs, "targets": tgts, "valid": torch.arange(micro) < n}


def _eval_images(b: dict, device: torch.device | None, bad: dict) -> torch.Tensor:
    """The images of an eval worker batch, padded to its rows; rows that could not be decoded on
    ``device`` are counted in ``bad`` and marked invalid in ``b["valid"]``."""
    images, failed = decode_batch(b, device, bad)
    b["valid"][failed] = False
    missing = b["valid"].shape[0] - images.shape[0]
    return torch.cat([images, images.new_zeros(missing, *images.shape[1:])]) if missing else images


class ShardEval:
    """One rank's part of an eval shard set: shard ``i`` on rank ``i % world``. Iterating yields
    batches; every rank yields the same number of batches (padding rows have ``valid=False``) so
    collectives stay in step under ZeRO-3. ``expected`` is the number of samples the whole set
    holds (all ranks; None when ``train.eval_batches`` caps the set); after iterating, ``bad``
    holds this rank's unusable samples by (reason, shard)."""

    def __init__(self, spec: LoaderSpec, rank: int, world: int, source: str, split: str = "val",
                 key: str = "data.val"):
        self.spec, self.rank, self.world = spec, rank, world
        self.shards = resolve_shards(source, split, key=key, samples_per_epoch=spec.data.samples_per_epoch)
        check_labels(self.shards, spec, key)
        self.device = decode_device(spec)
        self.expected = None if spec.eval_batches else self.shards.samples
        self.bad: dict = {}

    def __iter__(self) -> Iterator[Batch]:
        spec, shards = self.spec, self.shards
        micro = spec.micro_batch
        workers = max(1, min(spec.workers, 8)) if spec.workers else 1  # 0: one in-process reader
        counts = shards.counts or tuple(0 for _ in shards.urls)
        per_rank = []
        for r in range(self.world):
            mine = list(range(r, len(shards.urls), self.world))
            per_rank.append(sum(-(-sum(counts[i] for i in mine[w::workers]) // micro) for w in range(workers)))
        total = max(per_rank)
        if spec.eval_batches:
            total = min(total, spec.eval_batches)
        mine = list(range(self.rank, len(shards.urls), self.world))
        loader = DataLoader(_EvalShards(shards, spec, mine, workers), batch_size=None,
                            **worker_options(workers if spec.workers else 0))
        produced = 0
        self.bad = {}
        for b in loader:
            add_counts(self.bad, b["bad"])
            if produced == total:
                break
            if b["images"] is None:
                continue
            produced += 1
            images = _eval_images(b, self.device, self.bad)
            yield Batch(images, b["targets"], [], b["valid"])
        size = spec.img_size
        while produced < total:
            produced += 1
            empty = torch.zeros(micro, 3, size, size, dtype=torch.uint8, device=self.device)
            tgt = (torch.zeros(micro, spec.num_classes) if spec.data.multi_label
                   else torch.zeros(micro, dtype=torch.long))
            yield Batch(empty, tgt, [], torch.zeros(micro, dtype=torch.bool))
