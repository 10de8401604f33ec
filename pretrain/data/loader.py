"""Streaming WebDataset input for training and evaluation, with exact resume.

Each rank runs a torch DataLoader whose ``W`` workers each own one *slot* of the shard layout
(:mod:`pretrain.data.stream`); a worker decodes and augments on the CPU and hands over whole
micro batches of uint8 images (pinned when there is a GPU), which cross to the device as uint8
(a quarter of float32's bytes) and are normalised there by the engine. PyTorch serves worker batches
round-robin, so batch ``k`` of a rank comes from worker ``k % W``: the sequence is a pure function
of (seed, layout) and independent of timing.

Resume: the state records, per worker, the stream position (samples consumed in index units,
see :class:`pretrain.data.stream.StreamItem`) of the last batch *delivered* to the training loop
(not the ones prefetched). A resumed rank restarts every worker exactly there (rotating which
DataLoader worker serves which slot so the round-robin continues with the slot that was next),
skipping whole epochs by the index counts and the rest without decoding. With the same world
size and worker count the continuation is exact (the same keys in the same order), also after
samples were lost to damaged shards. With another world size or worker count the shard layout
changes; the loader then resumes at the same number of samples into the current epoch (each new
slot skips its share), so no more than the batches in flight are repeated or skipped in count,
but which samples fill the rest of that epoch differs.

Augmentation (the pipeline of :mod:`pretrain.data.ops`: crop, flip, then pixel operations such
as RandAugment) is seeded per sample by (seed, epoch, sample key): the same
sample gets the same pixels whatever the number of ranks and workers, before or after a resume.
Workers resize each image straight into a batch buffer the rank process shares with them
(:mod:`pretrain.data.handover`), so a batch reaches it without another copy, without fresh pages
and without a file-descriptor transfer per batch; batches are uint8 with channels-last strides.

``data.decode=gpu`` (:mod:`pretrain.data.device_decode`): workers draw the same crop boxes and flips
from the same seeds but hand over the encoded JPEGs; the rank process decodes each batch with
nvJPEG and crops and resizes on its device, so batches arrive as uint8 on the device. A sample no
decoder can read there is counted as ``undecodable``; in training its row stays in the batch as a
zero image (the batch size is fixed), in evaluation it is left out of the scores. RandAugment
runs in the workers, so it needs ``data.decode=cpu``.

Unusable samples are skipped and counted by reason and shard (``undecodable``, ``missing_image``,
``missing_label``, ``bad_label``, ``label_out_of_range``; a damaged shard counts every sample its
index says it lost as ``truncated_shard`` or ``missing_shard``); the counts are part of the
loader state, so they add up over resumes. ``problem()`` reports when their share exceeds
``data.max_bad_frac``. Samples the set's ``dedup.json`` excludes (near-copies of evaluation images,
:mod:`pretrain.data.exclusions`) are dropped as they leave the stream and counted apart, as
``excluded``.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pretrain.core.errors import UserError, config_error
from pretrain.data.batch import Batch
from pretrain.data.config import LoaderSpec
from pretrain.data.device_decode import decode_packed, pack, plan_eval, plan_train
from pretrain.data.exclusions import KeyFilter, with_exclusions
from pretrain.data.handover import SharedBatches, receive
from pretrain.data.shard_sets import ShardSet, resolve_shards
from pretrain.data.shards import SampleError, TarSample, decode_label, image_bytes, shard_label
from pretrain.data.stream import read_shard, seeded, slot_shards, slot_stream
from pretrain.data.transforms import eval_transform, train_transform

_MIN_SEEN_FOR_BAD_CHECK = 100
_PREFETCH = 4  # batches in flight per worker
_POLL_S = 1.0  # how often a rank waiting for a batch looks at the stop flag and the stall clock
_STOP_GRACE_S = 10.0  # a stop signal while no batch comes: how long the batch still may take


def die_with_parent(_worker_id: int = 0) -> None:
    """``worker_init_fn``: the kernel kills a DataLoader worker when its rank dies (Linux), so a
    ``kill -9`` of the job never leaves a worker behind reading shards."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


class _TrainSlots(IterableDataset):
    """Yields micro batches of one slot per worker: dicts with uint8 images, targets, keys,
    the worker id, the slot's stream position after the batch, and bad-sample counts."""

    def __init__(self, shards: ShardSet, spec: LoaderSpec, rank: int, world: int, workers: int,
                 starts: list[int], rotation: int, buffers: SharedBatches | None, exclusion: KeyFilter):
        self.shards, self.spec, self.rank, self.world, self.workers, self.starts = \
            shards, spec, rank, world, workers, starts
        self.exclusion = exclusion  # drops the keys of the set's dedup.json, counted as "excluded"
        self.rotation = rotation  # DataLoader worker i serves slot (i + rotation) % W after a resume
        self.buffers = buffers  # where CPU decoding writes batches (None with data.decode=gpu)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        row = info.id if info is not None else 0
        w = (row + self.rotation) % self.workers
        try:
            yield from self._batches(row, w)
        except UserError as err:  # handed to the rank as it is (a worker's exception would carry a traceback)
            yield {"error": str(err), "worker": w}

    def _batches(self, row: int, w: int) -> Iterator[dict]:
        torch.set_num_threads(1)
        spec, d, pipeline = self.spec, self.spec.data, self.spec.pipeline
        slot, nslots = self.rank * self.workers + w, self.world * self.workers
        gpu, buffers = d.decode == "gpu", self.buffers
        crop = {"scale": pipeline.crop_scale, "hflip": pipeline.hflip}
        bad: dict = {}
        images, targets, keys, shards = [], [], [], []
        epoch, usable, example = None, 0, ""
        stream = self.exclusion.filter(slot_stream(self.shards, spec.seed, slot, nslots, d.shuffle_buffer,
                                                   self.starts[w], bad, spec.retry))
        for item in stream:
            if item.epoch != epoch:
                if epoch is not None and usable == 0:
                    raise UserError(_no_usable_sample(self.shards, spec.seed, epoch, slot, nslots, bad, example))
                epoch, usable = item.epoch, 0
            try:
                target = sample_target(item.sample, spec.num_classes, d.multi_label, d.label_key)
                rng = seeded("aug", spec.seed, item.epoch, item.sample.key)
                data = image_bytes(item.sample)
                if gpu:
                    img = plan_train(data, spec.img_size, rng, **crop)
                else:
                    img = train_transform(data, spec.img_size, rng, **crop, out=buffers.current(row)[len(images)])
                    pipeline.apply_pixel(img, rng)
            except Exception as err:  # any unusable sample is skipped and counted, never fatal
                key = (bad_reason(err), item.sample.shard)
                bad[key] = bad.get(key, 0) + 1
                example = example or f"{item.sample.key} in {item.sample.shard}: {err}"
                continue
            usable += 1
            images.append(img)
            targets.append(target)
            keys.append(item.sample.key)
            shards.append(item.sample.shard)
            if len(images) == spec.micro_batch:
                batch = pack(images, spec.img_size) if gpu else buffers.hand_over(row, len(images))
                labels = default_collate(targets) if d.multi_label else torch.stack(targets).numpy()  # inline
                yield {"images": batch, "targets": labels,
                       "keys": keys, "shards": shards, "worker": w, "pos": item.position, "epoch": item.epoch,
                       "bad": dict(bad), "excluded": self.exclusion.take()}
                images, targets, keys, shards = [], [], [], []
                bad.clear()  # the stream adds to this very dict


def _no_usable_sample(shards: ShardSet, seed: int, epoch: int, slot: int, nslots: int, bad: dict,
                      example: str) -> str:
    names = [shard_label(shards.urls[i]) for i in slot_shards(len(shards.urls), seed, epoch, slot, nslots)]
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(counts_by(bad, 0).items()))
    return (f"data.train: reading slot {slot} found no usable sample in a whole epoch of its shards {listed} "
            f"({why or 'no samples'}; e.g. {example or 'none'}); check them with `vitscale shards verify`, or "
            f"set data.label_key if the label is in another .json field")


class ShardTrain:
    """The training source over WebDataset shards (see the module docstring for guarantees).

    No wait is unbounded: a rank that gets no batch for ``data.stall_timeout_s`` stops with a
    :class:`UserError` naming the slot, its shards and the last key it delivered; while a batch
    is awaited the rank looks at ``interrupted()`` (set by the trainer to its stop flag) every
    second, and a stop signal that finds it waiting more than ``_STOP_GRACE_S`` ends the wait
    with a :class:`UserError` too (the latest checkpoint stays; nothing half-done is saved)."""

    interrupted: Callable[[], bool] = staticmethod(lambda: False)
    placement = "sharded"  # each rank's slots' positions; another world size: see reshard()

    def __init__(self, spec: LoaderSpec, rank: int, world: int):
        d = spec.data
        self.spec, self.rank, self.world = spec, rank, world
        self.shards, self.exclusion = with_exclusions(
            resolve_shards(d.train, "train", key="data.train", samples_per_epoch=d.samples_per_epoch))
        self.workers = max(1, d.workers)
        check_layout(self.shards, world, self.workers)
        check_labels(self.shards, spec, "data.train")
        self.device = decode_device(spec)
        self.positions = [0] * self.workers
        self.batches = 0
        self.epoch = 0
        self.bad: dict = {}
        self.seen = 0
        self.excluded = 0  # samples dropped by dedup.json (not lost: not in self.bad)
        self.last_keys: dict[int, str] = {}
        self._it = None
        self._buffers: SharedBatches | None = None

    def _start(self) -> None:
        self.close()
        n = self.spec.workers
        if self.device is None:  # CPU decoding: batch buffers the workers fill in place
            self._buffers = SharedBatches(n, _PREFETCH + 2, self.spec.micro_batch, self.spec.img_size)
        self.spec.pipeline.prepare()  # imports (torchvision) before the workers fork
        ds = _TrainSlots(self.shards, self.spec, self.rank, self.world, self.workers, list(self.positions),
                         self.batches % self.workers, self._buffers, self.exclusion)
        loader = DataLoader(ds, batch_size=None, num_workers=n, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=_PREFETCH if n else None, persistent_workers=False,
                            timeout=_POLL_S if n else 0, worker_init_fn=die_with_parent if n else None)
        self._it = iter(loader)

    def _next(self) -> dict:
        """The next worker batch, waiting in polls of ``_POLL_S`` (see the class docstring)."""
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
                raise UserError(f"stop signal received while rank {self.rank} waited {now - t0:.0f} s for a batch "
                                f"from {self._slot_line()}: exiting without a save (the latest checkpoint stays)")
            if now - t0 > self.spec.data.stall_timeout_s:
                raise UserError(f"rank {self.rank} got no batch for {now - t0:.0f} s (data.stall_timeout_s="
                                f"{self.spec.data.stall_timeout_s:g}) from {self._slot_line()}; check that "
                                f"storage, or raise data.stall_timeout_s")
            if now - t0 > note_at:
                note_at += 60.0
                print(f"data: rank {self.rank} has waited {now - t0:.0f} s for a batch from {self._slot_line()}",
                      file=sys.stderr, flush=True)

    def _slot_line(self) -> str:
        """The slot the next batch comes from, its shards this epoch and the last key it gave."""
        w = self.batches % self.workers
        slot, nslots = self.rank * self.workers + w, self.world * self.workers
        names = [shard_label(self.shards.urls[i])
                 for i in slot_shards(len(self.shards.urls), self.spec.seed, self.epoch, slot, nslots)]
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"slot {slot} (shards {listed}; last key {self.last_keys.get(w, 'none yet')})"

    def next_batch(self) -> Batch:
        if self._it is None:
            self._start()
        b = self._next()
        if "error" in b:
            self.close()
            raise UserError(b["error"])
        self.positions[b["worker"]] = b["pos"]
        self.last_keys[b["worker"]] = b["keys"][-1]
        self.batches += 1
        self.epoch = b["epoch"]
        add_counts(self.bad, b["bad"])
        self.excluded += b["excluded"]
        self.seen += len(b["keys"]) + sum(b["bad"].values())
        images, _ = decode_batch(b, self.device, self.bad) if self.device else (receive(b["images"]), [])
        targets = b["targets"]
        return Batch(images, torch.from_numpy(targets) if isinstance(targets, np.ndarray) else targets,
                     list(b["keys"]))

    def state_dict(self) -> dict:
        micro = self.spec.micro_batch
        return {"kind": "shards", "epoch": self.epoch, "positions": list(self.positions), "workers": self.workers,
                "world": self.world, "batches": self.batches, "global_samples": self.batches * micro * self.world,
                "seen": self.seen, "excluded": self.excluded,
                "bad": [[reason, shard, n] for (reason, shard), n in sorted(self.bad.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))
        self.epoch = int(state.get("epoch", 0))
        self.seen = int(state.get("seen", 0))
        self.excluded = int(state.get("excluded", 0))
        self.bad = {(reason, shard): int(n) for reason, shard, n in state.get("bad", [])}
        if state.get("kind") == "shards" and state.get("workers") == self.workers and state.get("world") == self.world:
            self.positions = [int(p) for p in state["positions"]]
        else:  # another layout: each slot skips its share of the samples consumed so far
            consumed = int(state.get("global_samples", state.get("position", 0)))
            self.positions = [consumed // (self.world * self.workers)] * self.workers
            self.batches = consumed // (self.spec.micro_batch * self.world)
        self._it = None

    def reshard(self, parts: list[dict]) -> None:
        """Continue after a checkpoint of another world size (``parts``: every old rank's state):
        each slot skips its share of the samples all ranks consumed together; the old ranks'
        lost-sample counts are summed into rank 0's, so the totals stay whole."""
        state = {**parts[0], "kind": "resharded"}
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

    def stats(self) -> dict:
        """This rank's bad-sample counts so far: total, by reason and by shard, and its samples
        excluded by dedup.json (the loop sums them over ranks)."""
        return {"epoch": self.epoch, "bad_samples": sum(self.bad.values()), "bad_by_reason": counts_by(self.bad, 0),
                "bad_by_shard": counts_by(self.bad, 1), "samples_seen": self.seen, "excluded": self.excluded}

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


def check_layout(shards: ShardSet, world: int, workers: int) -> None:
    """Every dataloader worker of every rank needs a shard of its own (else ranks would see
    different numbers of steps per epoch)."""
    n, need = len(shards.urls), world * workers
    if n < need:
        rewrite = (f"rewrite with more shards (`vitscale shards write ... --samples-per-shard "
                   f"{max(1, (shards.samples or n) // need)}`)")
        fix = f"set data.workers={n // world}, or {rewrite}" if n >= world else rewrite
        raise UserError(f"data.train has {n} shards but {world} ranks x {workers} workers need at least "
                        f"{need} (each worker reads its own shards): {fix}")


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
                            num_workers=workers if spec.workers else 0,
                            worker_init_fn=die_with_parent if spec.workers else None)
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
