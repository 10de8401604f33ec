"""Streaming WebDataset input for training and evaluation, with exact resume.

Each rank runs a torch DataLoader whose ``W`` workers each own one *slot* of the shard layout
(:mod:`pretrain.data.stream`); a worker decodes and augments on the CPU and hands over whole
micro batches of uint8 images (normalised later, on the device). PyTorch serves worker batches
round-robin, so batch ``k`` of a rank comes from worker ``k % W``: the sequence is a pure function
of (seed, layout, position).

Resume: the state records, per worker, how many raw samples its stream has consumed for the
batches the loop actually received (not the ones prefetched). A resumed rank restarts every
worker exactly there (rotating which DataLoader worker serves which slot so the round-robin
continues with the slot that was next), skipping whole epochs by the index counts and the rest without decoding.
With the same world size and worker count the continuation is exact (the same keys in the same
order). With another world size or worker count the shard layout changes; the loader then
resumes at the same number of samples into the current epoch (each new slot skips its share),
so no more than the batches in flight are repeated or skipped in count, but which samples fill
the rest of that epoch differs.

Augmentation randomness is seeded per sample (seed, epoch, slot, index), independent of timing.
Undecodable samples or samples without a label are skipped and counted by reason and shard;
``problem()`` reports when their share exceeds ``data.max_bad_frac``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.core.errors import UserError
from pretrain.data.pipeline import Batch
from pretrain.data.stream import IMAGE_EXTS, RawSample, ShardSet, resolve_shards, seeded, slot_stream
from pretrain.data.transforms import eval_transform, normalize, train_transform
from pretrain.train.config import Config

_MIN_SEEN_FOR_BAD_CHECK = 100


def decode_label(sample: RawSample, num_classes: int, multi_label: bool) -> torch.Tensor:
    """Class index (int64 scalar) from ``.cls``, or a multi-hot float row from ``.json`` labels."""
    if multi_label:
        if "json" not in sample.files:
            raise ValueError("missing_label")
        labels = json.loads(sample.files["json"]).get("labels")
        if not labels:
            raise ValueError("missing_label")
        row = torch.zeros(num_classes)
        idx = torch.tensor([int(x) for x in labels])
        if idx.max() >= num_classes or idx.min() < 0:
            raise ValueError("label_out_of_range")
        return row.index_fill_(0, idx, 1.0)
    if "cls" in sample.files:
        label = int(sample.files["cls"].decode().strip())
    elif "json" in sample.files and "label" in json.loads(sample.files["json"]):
        label = int(json.loads(sample.files["json"])["label"])
    else:
        raise ValueError("missing_label")
    if not 0 <= label < num_classes:
        raise ValueError("label_out_of_range")
    return torch.tensor(label)


def _image_bytes(sample: RawSample) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample.files:
            return sample.files[ext]
    raise ValueError("missing_image")


class _TrainSlots(IterableDataset):
    """Yields micro batches of one slot per worker: dicts with uint8 images, targets, keys,
    the worker id, the slot's raw position after the batch, and bad-sample counts."""

    def __init__(self, shards: ShardSet, cfg: Config, rank: int, world: int, workers: int, skips: list[int],
                 rotation: int):
        self.shards, self.cfg, self.rank, self.world, self.workers, self.skips = \
            shards, cfg, rank, world, workers, skips
        self.rotation = rotation  # DataLoader worker i serves slot (i + rotation) % W after a resume

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = ((info.id if info is not None else 0) + self.rotation) % self.workers
        torch.set_num_threads(1)
        cfg, d = self.cfg, self.cfg.data
        slot, nslots = self.rank * self.workers + w, self.world * self.workers
        bad: dict = {}
        pos = self.skips[w]
        micro, size = cfg.train.micro_batch, cfg.model.img_size
        images, targets, keys = [], [], []
        multi = d.multi_label
        for epoch, idx, sample in slot_stream(self.shards, cfg.run.seed, slot, nslots, d.shuffle_buffer, pos, bad):
            pos += 1
            try:
                target = decode_label(sample, cfg.model.num_classes, multi)
                rng = seeded("aug", cfg.run.seed, epoch, slot, idx)
                img = train_transform(_image_bytes(sample), size, rng, scale=(d.crop_scale_min, 1.0),
                                      hflip=0.5 if d.hflip else 0.0)
            except Exception as err:  # any undecodable sample is skipped and counted, never fatal
                reason = str(err) if isinstance(err, ValueError) and str(err).isidentifier() else "undecodable"
                bad[(reason, sample.shard)] = bad.get((reason, sample.shard), 0) + 1
                continue
            images.append(img)
            targets.append(target)
            keys.append(sample.key)
            if len(images) == micro:
                yield {"images": torch.stack(images), "targets": torch.stack(targets), "keys": keys,
                       "worker": w, "pos": pos, "epoch": epoch, "bad": bad}
                images, targets, keys, bad = [], [], [], {}


class ShardTrain:
    """The training source over WebDataset shards (see the module docstring for guarantees)."""

    def __init__(self, cfg: Config, rank: int, world: int):
        d = cfg.data
        self.cfg, self.rank, self.world = cfg, rank, world
        self.shards = resolve_shards(d.train, "train", d.samples_per_epoch)
        self.workers = max(1, d.workers)
        check_layout(self.shards, world, self.workers, d.train)
        _check_labels(self.shards, cfg)
        self.positions = [0] * self.workers
        self.batches = 0
        self.epoch = 0
        self.bad: dict = {}
        self.seen = 0
        self._it = None

    def _start(self) -> None:
        ds = _TrainSlots(self.shards, self.cfg, self.rank, self.world, self.workers, list(self.positions),
                         self.batches % self.workers)
        n = self.cfg.data.workers
        loader = DataLoader(ds, batch_size=None, num_workers=n, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if n else None, persistent_workers=False)
        self._it = iter(loader)

    def next_batch(self) -> Batch:
        if self._it is None:
            self._start()
        b = next(self._it)
        self.positions[b["worker"]] = b["pos"]
        self.batches += 1
        self.epoch = b["epoch"]
        for key, n in b["bad"].items():
            self.bad[key] = self.bad.get(key, 0) + n
        self.seen += len(b["keys"]) + sum(b["bad"].values())
        return Batch(normalize(b["images"]), b["targets"], list(b["keys"]))

    def state_dict(self) -> dict:
        micro = self.cfg.train.micro_batch
        return {"kind": "shards", "epoch": self.epoch, "positions": list(self.positions), "workers": self.workers,
                "world": self.world, "batches": self.batches, "global_samples": self.batches * micro * self.world}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))
        self.epoch = int(state.get("epoch", 0))
        if state.get("kind") == "shards" and state.get("workers") == self.workers and state.get("world") == self.world:
            self.positions = [int(p) for p in state["positions"]]
        else:  # another layout: each slot skips its share of the samples consumed so far
            consumed = int(state.get("global_samples", state.get("position", 0)))
            self.positions = [consumed // (self.world * self.workers)] * self.workers
            self.batches = consumed // (self.cfg.train.micro_batch * self.world)
        self._it = None

    def stats(self) -> dict:
        total = sum(self.bad.values())
        by_reason: dict[str, int] = {}
        for (reason, _), n in self.bad.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        return {"epoch": self.epoch, "bad_samples": total, "bad_by_reason": by_reason}

    def problem(self) -> str | None:
        total = sum(self.bad.values())
        if self.seen < _MIN_SEEN_FOR_BAD_CHECK or total <= self.cfg.data.max_bad_frac * self.seen:
            return None
        worst = sorted(self.bad.items(), key=lambda kv: -kv[1])[:5]
        named = ", ".join(f"{shard} ({reason}: {n})" for (reason, shard), n in worst)
        return (f"{total} of {self.seen} training samples on rank {self.rank} were unreadable "
                f"({100 * total / self.seen:.1f}% > data.max_bad_frac={self.cfg.data.max_bad_frac}); worst shards: "
                f"{named}. Check them with `vitscale shards verify`, or raise data.max_bad_frac")

    def close(self) -> None:
        self._it = None


def check_layout(shards: ShardSet, world: int, workers: int, where: str) -> None:
    n, need = len(shards.urls), world * workers
    if n < need:
        raise UserError(f"data.train={where!r} has {n} shards but {world} ranks x {workers} workers need at least "
                        f"{need} (each worker reads its own shards): set data.workers={max(1, n // world)}, or "
                        f"rewrite with more shards (`vitscale shards write ... --samples-per-shard "
                        f"{max(1, (shards.samples or n) // need)}`)")


def _check_labels(shards: ShardSet, cfg: Config) -> None:
    if shards.multi_label is not None and shards.multi_label != cfg.data.multi_label:
        kind = "multi-label" if shards.multi_label else "single-label"
        raise UserError(f"the shards are {kind} but data.multi_label={cfg.data.multi_label}: set "
                        f"data.multi_label={str(shards.multi_label).lower()}"
                        + (" and train.loss=sigmoid" if shards.multi_label else ""))
    if shards.num_classes is not None and shards.num_classes > cfg.model.num_classes:
        raise UserError(f"the shards hold {shards.num_classes} classes but model.num_classes="
                        f"{cfg.model.num_classes}: set model.num_classes={shards.num_classes}")


class _EvalShards(IterableDataset):
    def __init__(self, shards: ShardSet, cfg: Config, mine: list[int], workers: int):
        self.shards, self.cfg, self.mine, self.workers = shards, cfg, mine, workers

    def __iter__(self) -> Iterator[dict]:
        from pretrain.data.stream import iter_raw_samples

        info = get_worker_info()
        w = info.id if info is not None else 0
        torch.set_num_threads(1)
        cfg = self.cfg
        micro, size = cfg.train.micro_batch, cfg.model.img_size
        images, targets = [], []
        bad: dict = {}
        for i in self.mine[w::self.workers]:
            for sample in iter_raw_samples(self.shards.urls[i], bad):
                try:
                    target = decode_label(sample, cfg.model.num_classes, cfg.data.multi_label)
                    img = eval_transform(_image_bytes(sample), size, cfg.data.eval_crop_pct)
                except Exception:  # counted as missing from the eval set
                    continue
                images.append(img)
                targets.append(target)
                if len(images) == micro:
                    yield _pad(images, targets, micro)
                    images, targets = [], []
        if images:
            yield _pad(images, targets, micro)


def _pad(images: list, targets: list, micro: int) -> dict:
    n = len(images)
    imgs = torch.stack(images + [torch.zeros_like(images[0])] * (micro - n))
    tgts = torch.stack(targets + [torch.zeros_like(targets[0])] * (micro - n))
    return {"images": imgs, "targets": tgts, "valid": torch.arange(micro) < n}


def shard_eval(cfg: Config, rank: int, world: int, spec: str | None = None,
               split: str = "val") -> Iterator[Batch]:
    """The ``split`` of ``spec`` (default ``data.val``), shard ``i`` on rank ``i % world``; every
    rank yields the same number of batches (padding rows have ``valid=False``) so collectives stay
    in step under ZeRO-3."""
    shards = resolve_shards(spec or cfg.data.val, split, None)
    micro = cfg.train.micro_batch
    workers = max(1, min(cfg.data.workers, 8)) if cfg.data.workers else 1  # 0: one in-process reader
    counts = shards.counts or tuple(0 for _ in shards.urls)
    per_rank = []
    for r in range(world):
        mine = list(range(r, len(shards.urls), world))
        per_rank.append(sum(-(-sum(counts[i] for i in mine[w::workers]) // micro) for w in range(workers)))
    total = max(per_rank)
    if cfg.train.eval_batches:
        total = min(total, cfg.train.eval_batches)
    mine = list(range(rank, len(shards.urls), world))
    loader = DataLoader(_EvalShards(shards, cfg, mine, workers), batch_size=None,
                        num_workers=workers if cfg.data.workers else 0)
    produced = 0
    for b in loader:
        if produced == total:
            break
        produced += 1
        yield Batch(normalize(b["images"]), b["targets"], [], b["valid"])
    size = cfg.model.img_size
    while produced < total:
        produced += 1
        empty = torch.zeros(micro, 3, size, size)
        tgt = (torch.zeros(micro, cfg.model.num_classes) if cfg.data.multi_label
               else torch.zeros(micro, dtype=torch.long))
        yield Batch(empty, tgt, [], torch.zeros(micro, dtype=torch.bool))
