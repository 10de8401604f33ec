"""The ``data`` section of the run config, and what an input pipeline is built from.

The section lives on the data floor so that the loaders take it without importing the training
floor above; :class:`pretrain.train.config.Config` composes it with the other sections and
builds a :class:`LoaderSpec` for the loaders (``Config.loader()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.core.errors import require
from pretrain.data.ops import PixelStep, TrainPipeline, parse_pipeline
from pretrain.data.stream import Retry

DECODERS = ("cpu", "gpu")


@dataclass(frozen=True)
class TrainSource:
    """One source of a weighted mixture (``data.train: [{source: ..., weight: ...}, ...]``)."""

    source: str
    weight: float = 1.0

    def __post_init__(self):
        require(isinstance(self.source, str) and bool(self.source.strip()) and self.source != "synthetic",
                "data.train[].source", self.source, "give a shard folder, pattern or URL list")
        require(self.weight > 0, f"data.train[{self.source}].weight", self.weight, "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    # "synthetic", a shard set (see pretrain.data.shard_sets), or a weighted mixture of shard sets
    train: str | tuple[TrainSource, ...] = "synthetic"
    val: str | None = "synthetic"  # the same; null: no evaluation
    workers: int = 4
    samples_per_epoch: int | None = None  # needed for remote shards without index.json
    val_samples: int = 512  # synthetic eval size; shards: the whole val split
    synthetic_classes: int | None = None  # None: model.num_classes
    multi_label: bool = False
    shuffle_buffer: int = 2000
    crop_scale_min: float = 0.05
    hflip: bool = True
    eval_crop_pct: float = 1.0
    max_bad_frac: float = 0.01
    decode: str = "cpu"  # "cpu": workers decode (libjpeg-turbo); "gpu": nvJPEG in the rank process
    label_key: str | None = None  # the .json field holding the label (None: "label", or "labels" if multi-label)
    retries: int = 8  # reconnects in a row of a remote shard read before its rest counts as lost
    retry_max_s: float = 30.0  # longest wait between two reconnects (waits double from 0.5 s)
    read_timeout_s: float = 60.0  # longest wait for a remote connect or read
    stall_timeout_s: float = 600.0  # a rank that gets no batch for this long stops the job
    streams: int | None = None  # canonical streams of the training order (None: see pretrain.data.stream.auto_streams)

    def __post_init__(self):
        require(bool(self.train), "data.train", self.train, "give 'synthetic' or a shard folder/pattern")
        if not isinstance(self.train, str):
            names = [t.source for t in self.train]
            require(len(set(names)) == len(names), "data.train", names, "names a source twice")
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        require(self.samples_per_epoch is None or self.samples_per_epoch > 0, "data.samples_per_epoch",
                self.samples_per_epoch, "must be > 0, or null for indexed shard sets")
        require(self.val_samples > 0, "data.val_samples", self.val_samples, "must be > 0")
        require(self.synthetic_classes is None or self.synthetic_classes > 1, "data.synthetic_classes",
                self.synthetic_classes, "must be > 1, or null for model.num_classes")
        require(0.0 < self.crop_scale_min <= 1.0, "data.crop_scale_min", self.crop_scale_min, "use (0, 1]")
        require(0.0 < self.eval_crop_pct <= 1.0, "data.eval_crop_pct", self.eval_crop_pct, "use (0, 1]")
        require(0.0 <= self.max_bad_frac <= 1.0, "data.max_bad_frac", self.max_bad_frac, "use [0, 1]")
        require(self.decode in DECODERS, "data.decode", self.decode, f"use one of {', '.join(DECODERS)}")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        require(self.label_key is None or bool(str(self.label_key).strip()), "data.label_key", self.label_key,
                "name the .json field holding the label, or null")
        require(self.retries >= 0, "data.retries", self.retries, "must be >= 0 (0: no retry)")
        require(self.retry_max_s > 0, "data.retry_max_s", self.retry_max_s, "must be > 0 seconds")
        require(self.read_timeout_s > 0, "data.read_timeout_s", self.read_timeout_s, "must be > 0 seconds")
        require(self.streams is None or self.streams > 0, "data.streams", self.streams,
                "must be > 0 (a divisor of train.global_batch that the number of ranks divides), or null")
        require(self.stall_timeout_s > 0, "data.stall_timeout_s", self.stall_timeout_s, "must be > 0 seconds")


def train_sources(data: DataConfig) -> list[TrainSource]:
    """``data.train`` as a list of weighted sources (a single shard set: one of weight 1)."""
    return [TrainSource(data.train)] if isinstance(data.train, str) else list(data.train)


@dataclass(frozen=True)
class AugmentConfig:
    """The ``augment`` section (AugReg / DeiT augmentations; everything off by default).

    ``ops`` spells the whole training transform as registered image operations
    (:mod:`pretrain.data.ops`: ``"inception_crop(0.08)|flip|three_augment(0.3)"``); without it the
    pipeline is an Inception crop (``data.crop_scale_min``), a flip (``data.hflip``) and RandAugment
    when ``randaug_layers`` > 0. RandAugment runs in the loader workers on the cropped uint8 image,
    seeded per sample like the crop. ``randaug_magnitude`` is on the TF / big_vision level scale, where 10 is each
    operation's nominal maximum (shear 0.3, rotate 30 degrees, translate 150/331 of the side,
    enhance +-0.9, ...); torchvision's operations stop at those maxima, so big_vision's
    ``randaug(2,15)`` and ``randaug(2,20)`` act here as magnitude 10. Mixup / CutMix run on the
    device, per micro batch (see :mod:`pretrain.train.mixing`)."""

    ops: str | tuple[str, ...] | None = None  # the training pipeline (pretrain.data.ops); None: the keys below
    randaug_layers: int = 0  # 0: off
    randaug_magnitude: float = 10.0
    mixup_alpha: float = 0.0  # 0: off; Beta(alpha, alpha) mixing ratio
    cutmix_alpha: float = 0.0  # 0: off
    mix_prob: float = 1.0  # chance a micro batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance of CutMix instead of Mixup

    def __post_init__(self):
        if self.ops is not None:
            parse_pipeline(self.ops)  # a mistake is one line naming augment.ops and the item
            require(not self.randaug_layers, "augment.randaug_layers", self.randaug_layers,
                    "augment.ops spells the pipeline: write randaug(L,M) there instead, or drop augment.ops")
        require(self.randaug_layers >= 0, "augment.randaug_layers", self.randaug_layers, "must be >= 0 (0 = off)")
        require(0.0 <= self.randaug_magnitude <= 30.0, "augment.randaug_magnitude", self.randaug_magnitude,
                "use [0, 30] on the TF level scale (10 = the operations' maxima)")
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(self, key) >= 0.0, f"augment.{key}", getattr(self, key), "must be >= 0 (0 = off)")
        for key in ("mix_prob", "switch_prob"):
            require(0.0 <= getattr(self, key) <= 1.0, f"augment.{key}", getattr(self, key), "use [0, 1]")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


# Settings that only the shard pipelines read: key -> (the pipelines that read it, values besides the
# default that describe synthetic data anyway: never flipped, made in the rank process, not shuffled)
_SHARD_SETTINGS = {
    "augment.ops": (("train",), ()),
    "augment.randaug_layers": (("train",), ()),
    "data.crop_scale_min": (("train",), ()),
    "data.hflip": (("train",), (False,)),
    "data.shuffle_buffer": (("train",), (0,)),
    "data.max_bad_frac": (("train",), ()),
    "data.samples_per_epoch": (("train", "val"), ()),
    "data.decode": (("train", "val"), ()),
    "data.workers": (("train", "val", "fewshot"), (0,)),
    "data.eval_crop_pct": (("val", "fewshot"), ()),
    "data.label_key": (("train", "val"), ()),
    "data.stall_timeout_s": (("train",), ()),
    "data.streams": (("train",), ()),
    "data.retries": (("train", "val", "fewshot"), ()),
    "data.retry_max_s": (("train", "val", "fewshot"), ()),
    "data.read_timeout_s": (("train", "val", "fewshot"), ()),
}


def unread_settings(data: DataConfig, augment: AugmentConfig, readers: set[str]) -> list[str]:
    """``key=value`` of each shard-only setting that is set (differs from its default and from
    what synthetic data does anyway) although no pipeline that reads it runs on shards.
    ``readers``: which of "train", "val" (``data.train`` / ``data.val`` not synthetic) and
    "fewshot" (few-shot datasets, always shards) run. Synthetic data would silently ignore these,
    so the launch refuses them (:func:`pretrain.train.checks.check_data`)."""
    sections = {"data": (data, DataConfig()), "augment": (augment, AugmentConfig())}
    out = []
    for key, (read_by, inert) in _SHARD_SETTINGS.items():
        if readers.intersection(read_by):
            continue
        section, name = key.split(".")
        value, default = getattr(sections[section][0], name), getattr(sections[section][1], name)
        if value != default and not any(value is v or (type(value) is type(v) and value == v) for v in inert):
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


@dataclass(frozen=True)
class LoaderSpec:
    """Everything an input pipeline depends on: the data section plus the run facts it needs."""

    data: DataConfig
    micro_batch: int
    img_size: int
    num_classes: int
    seed: int
    eval_batches: int | None = None  # cap on eval batches per rank (None: the whole set)
    augment: AugmentConfig = AugmentConfig()
    decode_device: str = "cuda"  # where data.decode=gpu decodes: the rank's current CUDA device (tests: "cpu")
    grad_accum: int = 1  # micro batches per rank and step (global batch = micro_batch x grad_accum x world)

    @property
    def workers(self) -> int:
        """Dataloader workers per rank; 0 means one reader inside the training process."""
        return self.data.workers

    @property
    def pipeline(self) -> TrainPipeline:
        """The training transform: ``augment.ops``, else the one the shorthand keys spell."""
        a, d = self.augment, self.data
        if a.ops is not None:
            return parse_pipeline(a.ops)
        pixel = (PixelStep("randaug", (a.randaug_layers, a.randaug_magnitude)),) if a.randaug_layers else ()
        return TrainPipeline((d.crop_scale_min, 1.0), 0.5 if d.hflip else 0.0, pixel)

    @property
    def retry(self) -> Retry:
        d = self.data
        return Retry(d.retries, d.retry_max_s, d.read_timeout_s)
