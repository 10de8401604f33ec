"""Run configuration: frozen dataclasses per concern, each validated in ``__post_init__``.

Sections: ``run``, ``model``, ``data`` and ``augment`` (defined in :mod:`pretrain.data.config`,
beside the loaders that take them), ``train``, ``optim``, ``zero``, ``ema``, ``checkpoint``,
``log``, ``finetune``.
Every mistake raises :class:`UserError` with one line naming the key, the value and the fix.
Reading YAML and overrides is :mod:`pretrain.train.config_file`; ``to_dict`` gives the resolved
config that is written next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.core.errors import config_error as _fail
from pretrain.core.errors import require as _check
from pretrain.data.config import AugmentConfig, DataConfig, LoaderSpec
from pretrain.model.fp8 import FP8_ALIGN, FP8_MODES, convert_blocks_to_fp8
from pretrain.model.vit import ACTIVATIONS, VisionTransformer, ViTSpec, build_model, spec_for
from pretrain.train.fewshot_config import FewshotConfig


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    deterministic: bool = False  # bitwise-reproducible kernels (slower); used by resume tests
    timeout_s: int = 1800  # a collective waiting longer than this (dead or stuck peer) ends the job

    def __post_init__(self):
        _check(bool(self.dir), "run.dir", self.dir, "give a directory for checkpoints and logs")
        _check(self.timeout_s > 0, "run.timeout_s", self.timeout_s,
               "must be > 0 seconds; keep it above the longest save or universal conversion")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: a named variant (``vit_h14``), any field of its
    :class:`~pretrain.model.vit.ViTSpec` overridden (None keeps the variant's), and how it runs
    (dropout, head bias, activation checkpointing, compile, flash, FP8 matmuls), which is not
    architecture; :meth:`build` makes the model a run trains."""

    name: str = "vit_b16"
    # architecture: the fields of ViTSpec (spec() passes every one of them to spec_for)
    img_size: int = 224
    patch_size: int | None = None  # None: the variant's own
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    heads: int | None = None
    num_classes: int = 1000
    representation_size: int | str | None = "auto"  # "auto" = width (pre-logits); None = linear head
    pool: str = "cls"
    norm_eps: float | None = None  # LayerNorm epsilon; None: 1e-6, or in fine-tuning that of finetune.init
    # CLIP image towers (OpenCLIP weights); in fine-tuning taken from finetune.init unless set here
    pre_norm: bool = False  # LayerNorm before the blocks (ln_pre)
    patch_bias: bool = True  # the patch embedding has a bias
    act: str = "gelu"  # MLP activation: "gelu" or "quick_gelu"
    proj_dim: int | None = None  # bias-free projection of the pooled token (CLIP's proj); null: none
    # how it runs
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks to this rate
    patch_dropout: float = 0.0  # FLIP: share of patch tokens dropped per image in training
    head_bias_init: float = 0.0
    act_ckpt: bool | float = False  # activation checkpointing: every block, none, or a fraction of them
    compile: bool = False
    require_flash: bool = False
    fp8: str | bool = "off"  # FP8 matmuls in the blocks' Linear layers (torchao): "off", "tensorwise" or "rowwise"

    def __post_init__(self):
        if self.fp8 is False:  # YAML reads a bare `off` as false
            object.__setattr__(self, "fp8", "off")
        _check(self.fp8 in FP8_MODES, "model.fp8", self.fp8,
               f"use one of {', '.join(FP8_MODES)} (tensorwise: torchao's fastest FP8 recipe)")
        try:
            spec = self.spec()
        except ValueError as err:
            _fail("model.name", self.name, str(err))
        for key in ("width", "depth", "mlp_dim", "heads", "patch_size"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"model.{key}", v, "must be a positive integer, or null for the variant's")
        _check(spec.img_size > 0 and spec.img_size % spec.patch_size == 0, "model.img_size", self.img_size,
               f"must be a positive multiple of the patch size {spec.patch_size}")
        _check(spec.width % spec.heads == 0, "model.heads", spec.heads,
               f"must divide the width {spec.width}")
        _check(self.num_classes >= 0, "model.num_classes", self.num_classes, "must be >= 0")
        _check(self.pool in ("cls", "gap"), "model.pool", self.pool, "use 'cls' or 'gap'")
        _check(self.norm_eps is None or 0.0 < self.norm_eps < 1.0, "model.norm_eps", self.norm_eps,
               "must be a small positive number (1e-6 as vit_jax / timm, 1e-12 as HF), or null for 1e-6")
        _check(self.act in ACTIVATIONS, "model.act", self.act, f"use one of {', '.join(ACTIVATIONS)}")
        _check(self.proj_dim is None or self.proj_dim > 0, "model.proj_dim", self.proj_dim,
               "must be a positive integer (CLIP's embedding width), or null for no projection")
        rep = self.representation_size
        _check(rep is None or rep == "auto" or (isinstance(rep, int) and rep > 0),
               "model.representation_size", rep, "use 'auto' (= width), a positive int, or null")
        ckpt = self.act_ckpt
        _check(isinstance(ckpt, bool) or 0.0 < ckpt <= 1.0, "model.act_ckpt", ckpt,
               "use true (every block), false, or the fraction of blocks to recompute, e.g. 0.5")
        for key in ("dropout", "attn_dropout", "drop_path", "patch_dropout"):
            v = getattr(self, key)
            _check(0.0 <= v < 1.0, f"model.{key}", v, "must be in [0, 1)")
        _check(math.isfinite(self.head_bias_init), "model.head_bias_init", self.head_bias_init, "must be finite")
        if self.fp8 != "off":
            for key in ("width", "mlp_dim"):
                v = getattr(spec, key)
                _check(v % FP8_ALIGN == 0, f"model.{key}", v,
                       f"FP8 matmuls (model.fp8={self.fp8}) need it divisible by {FP8_ALIGN}; or set model.fp8=off")

    def spec(self) -> ViTSpec:
        return spec_for(self.name, **{f.name: getattr(self, f.name) for f in fields(ViTSpec)})

    def label(self) -> str:
        """``vit_b16``; the dimensions instead when overrides make the model another than ``name``'s."""
        spec, named = self.spec(), spec_for(self.name)
        dims = ("width", "depth", "mlp_dim", "heads", "patch_size")
        if all(getattr(spec, k) == getattr(named, k) for k in dims):
            return self.name
        return f"ViT (width {spec.width}, depth {spec.depth}, heads {spec.heads}, patch {spec.patch_size})"

    def runtime(self) -> dict:
        """Keywords of ``build_model`` besides the spec."""
        return {"dropout": self.dropout, "attn_dropout": self.attn_dropout, "head_bias_init": self.head_bias_init,
                "drop_path": self.drop_path, "patch_dropout": self.patch_dropout}

    def build(self, device: str | None = None,
              surgery: Callable[[VisionTransformer], None] | None = None) -> VisionTransformer:
        """The model a run trains, in this order: built on ``device`` (default CPU) with the
        runtime options, activation checkpointing set, ``surgery`` (fine-tuning's head swap and
        position-embedding resampling, on plain layers), the blocks' Linear layers swapped for
        FP8 ones (``fp8``; :mod:`pretrain.model.fp8`), blocks compiled (``compile``). The training
        run and ``vitscale bench train`` both build through here."""
        model = build_model(self.spec(), device=device, **self.runtime())
        model.set_grad_checkpointing(self.act_ckpt)
        if surgery is not None:
            surgery(model)
        if self.fp8 != "off":
            convert_blocks_to_fp8(model, self.fp8)
        if self.compile:
            model.compile_blocks()
        return model


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 32
    grad_accum: int | None = None  # None: global_batch / (micro_batch x world size), else 1
    global_batch: int | None = None  # images per optimizer step over all ranks
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int | None = None  # None: the whole val set
    loss: str = "softmax"  # "softmax" cross-entropy or "sigmoid" (multi-label)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True
    max_bad_steps: int = 5

    def __post_init__(self):
        for key in ("steps", "micro_batch", "log_every", "max_bad_steps"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"train.{key}", v, "must be a positive integer")
        _check(self.grad_accum is None or self.grad_accum > 0, "train.grad_accum", self.grad_accum,
               "must be a positive integer, or null to derive it from train.global_batch")
        _check(self.global_batch is None or self.global_batch > 0, "train.global_batch", self.global_batch,
               "must be a positive integer, or null")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0 = at the end)")
        _check(self.eval_batches is None or self.eval_batches > 0, "train.eval_batches", self.eval_batches,
               "must be a positive integer, or null for the whole val set")
        _check(self.loss in ("softmax", "sigmoid"), "train.loss", self.loss, "use 'softmax' or 'sigmoid'")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "use [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        if self.global_batch is not None:
            per_rank = self.micro_batch * (self.grad_accum or 1)
            _check(self.global_batch % per_rank == 0, "train.global_batch", self.global_batch,
                   f"must be a multiple of micro_batch x grad_accum = {per_rank}")

    def accum_for(self, world_size: int) -> int:
        """Gradient accumulation on ``world_size`` ranks: ``train.grad_accum`` when given (checked
        against ``train.global_batch``), else derived from ``train.global_batch`` (DeepSpeed's
        convention: the missing one of global batch, micro batch and accumulation follows from the
        other two), else 1. A global batch that does not split is a :class:`UserError` naming the
        nearest valid settings."""
        per_step = self.micro_batch * world_size
        if self.global_batch is None:
            return self.grad_accum or 1
        if self.grad_accum is not None:
            if self.micro_batch * self.grad_accum * world_size != self.global_batch:
                fix = (f"set train.grad_accum={self.global_batch // per_step} or drop it (it is then derived)"
                       if self.global_batch % per_step == 0 else nearest_batch_settings(self, world_size))
                raise UserError(
                    f"config train.global_batch={self.global_batch} != micro_batch {self.micro_batch} x grad_accum "
                    f"{self.grad_accum} x world size {world_size} = {per_step * self.grad_accum}: {fix}")
            return self.grad_accum
        if self.global_batch % per_step:
            raise UserError(
                f"config train.global_batch={self.global_batch} does not split over {world_size} ranks at "
                f"train.micro_batch={self.micro_batch} ({self.global_batch} / ({self.micro_batch} x {world_size}) = "
                f"{self.global_batch / per_step:g} accumulation steps): "
                f"{nearest_batch_settings(self, world_size)}")
        return self.global_batch // per_step

    def check_world(self, world_size: int) -> None:
        """Global batch = micro batch x grad accum x world size, checked before any allocation."""
        self.accum_for(world_size)


def nearest_batch_settings(t: TrainConfig, world: int) -> str:
    """The closest settings that do split: a smaller micro batch with the same global batch, and
    the neighbouring global batches at this micro batch."""
    options = []
    if t.global_batch % world == 0:
        per_rank = t.global_batch // world
        micro = max(m for m in range(1, min(t.micro_batch, per_rank) + 1) if per_rank % m == 0)
        if micro != t.micro_batch:
            options.append(f"train.micro_batch={micro} (grad_accum {per_rank // micro})")
    per_step = t.micro_batch * world
    below, above = (t.global_batch // per_step) * per_step, -(-t.global_batch // per_step) * per_step
    for g in dict.fromkeys((below, above)):
        if g > 0 and g != t.global_batch:
            options.append(f"train.global_batch={g} (grad_accum {g // per_step})")
    options.append("no train.global_batch (then micro batch x world size, with train.grad_accum or 1)")
    return "nearest valid settings: " + ", or ".join(options)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # "adamw" (pretrain) or "sgd" (fine-tune, momentum)
    lr: float = 1e-3
    weight_decay: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    warmup_steps: int = 0
    decay: str = "linear"  # "linear", "cosine" or "constant" after warmup
    min_lr: float = 0.0
    layer_decay: float = 1.0  # layer-wise LR decay for fine-tuning (1.0 = off), see engine.param_groups

    def __post_init__(self):
        _check(self.name in ("adamw", "sgd"), "optim.name", self.name, "use 'adamw' or 'sgd'")
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        for key in ("b1", "b2", "momentum"):
            _check(0.0 <= getattr(self, key) < 1.0, f"optim.{key}", getattr(self, key), "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.decay in ("linear", "cosine", "constant"), "optim.decay", self.decay,
               "use 'linear', 'cosine' or 'constant'")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "must be in [0, optim.lr]")
        _check(0.0 < self.layer_decay <= 1.0, "optim.layer_decay", self.layer_decay,
               "must be in (0, 1] (1 = off; 0.65-0.85 is usual for fine-tuning ViTs)")


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 2
    overlap_comm: bool = True
    bucket_mb: int = 200
    ds_config: str | None = None  # user DeepSpeed JSON merged over the generated one

    def __post_init__(self):
        _check(self.stage in (0, 1, 2, 3), "zero.stage", self.stage, "use 0, 1, 2 or 3")
        _check(self.bucket_mb > 0, "zero.bucket_mb", self.bucket_mb, "must be > 0")
        if self.ds_config is not None:
            _check(Path(self.ds_config).is_file(), "zero.ds_config", self.ds_config,
                   "no such file: give the path of a DeepSpeed JSON to merge, or drop the key")


@dataclass(frozen=True)
class EmaConfig:
    """The ``ema`` section: an exponential moving average of the fp32 master weights, sharded
    like them (see :mod:`pretrain.train.ema`); evaluated beside the raw weights (``ema_top1``)."""

    decay: float = 0.0  # 0: off; e.g. 0.9999
    warmup: bool = False  # timm's warm-up: decay_n = min(decay, 1 - (1 + n) ** (-2/3))

    def __post_init__(self):
        _check(0.0 <= self.decay < 1.0, "ema.decay", self.decay, "use [0, 1): 0 turns the EMA off, 0.9999 is usual")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3
    async_save: bool = True  # write in the background; the step waits only for the copy off the buffers

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0 (0 = only at the end)")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    peak_flops: float | None = None  # dense bf16 per device; None: from the device table (null on CPU); FP8 at 2x
    tensorboard: bool = False  # scalars under run.dir/tb (needs the tensorboard package)
    wandb: bool = False  # the same scalars to Weights & Biases (needs wandb; WANDB_MODE=offline keeps them local)
    wandb_project: str = "vitscale"
    wandb_name: str | None = None  # None: run.dir's folder name
    progress: bool = True
    sample_keys: bool = False  # debug: each rank appends its batch keys per step to sample_keys_rank{r}.jsonl

    def __post_init__(self):
        _check(self.peak_flops is None or self.peak_flops > 0, "log.peak_flops", self.peak_flops,
               "must be > 0 FLOP/s, e.g. 989e12 for an H100")
        _check(isinstance(self.wandb_project, str) and self.wandb_project.strip(), "log.wandb_project",
               self.wandb_project, "give the W&B project name, e.g. vit-pretrain")
        _check(self.wandb_name is None or (isinstance(self.wandb_name, str) and self.wandb_name.strip()),
               "log.wandb_name", self.wandb_name, "give a run name, or null for run.dir's folder name")


@dataclass(frozen=True)
class FinetuneConfig:
    init: str | None = None  # weights to start from (any supported format)
    init_weights: str = "model"  # "model" or "ema": which weights of a vitscale checkpoint to start from
    keep_pre_logits: bool = False
    pos_embed_mode: str = "bilinear"

    def __post_init__(self):
        _check(self.init_weights in ("model", "ema"), "finetune.init_weights", self.init_weights,
               "use 'model' (the trained weights) or 'ema' (their moving average, when the run kept one)")
        _check(self.pos_embed_mode in ("bilinear", "bicubic", "timm"), "finetune.pos_embed_mode",
               self.pos_embed_mode, "use 'bilinear' (vit_jax), 'bicubic' (torch, a=-0.75) or 'timm' (antialiased "
               "bicubic, as timm resamples)")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)  # see pretrain.train.fewshot_config

    def __post_init__(self):
        if self.data.multi_label and self.train.loss != "sigmoid":
            _fail("train.loss", self.train.loss, "multi-label data (data.multi_label=true) needs 'sigmoid'")
        if self.model.compile and self.zero.stage == 3:
            _fail("model.compile", True, "torch.compile cannot trace ZeRO-3's parameter gathering (module hooks): "
                  "use zero.stage=2, or model.compile=false")
        if self.ema.decay and self.zero.stage == 0:
            _fail("ema.decay", self.ema.decay, "the EMA is sharded like DeepSpeed's master weights: use zero.stage "
                  "1, 2 or 3")
        pipeline = self.loader().pipeline
        d = self.data
        if self.augment.ops is not None and (
                d.crop_scale_min not in (DataConfig.crop_scale_min, pipeline.crop_scale[0])
                or (not d.hflip and pipeline.hflip)):
            _fail("augment.ops", self.augment.ops, f"it spells the crop and the flip, which disagree with "
                  f"data.crop_scale_min={d.crop_scale_min} / data.hflip={d.hflip}: drop those keys, or augment.ops")
        pixel = pipeline.pixel
        if pixel and self.data.decode == "gpu":
            _fail("data.decode", "gpu", f"{', '.join(map(str, pixel))} run in the loader workers on decoded images: "
                  f"use data.decode=cpu, or leave them out of the pipeline")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loader(self) -> LoaderSpec:
        """What the input pipelines are built from (see :mod:`pretrain.data.config`)."""
        return LoaderSpec(self.data, self.train.micro_batch, self.model.img_size, self.model.num_classes,
                          self.run.seed, self.train.eval_batches, self.augment, grad_accum=self.train.grad_accum or 1)

    def for_world(self, world_size: int) -> Config:
        """This config with ``train.grad_accum`` resolved for ``world_size`` ranks (derived from
        ``train.global_batch`` when not given; :class:`UserError` when it does not split)."""
        return self.replace(train=dataclasses.replace(self.train, grad_accum=self.train.accum_for(world_size)))

    def batch_line(self, world_size: int) -> str:
        """``global batch 4096 = micro 64 x accum 8 x 8 ranks (accumulation derived ...)``."""
        t = self.train
        accum = t.accum_for(world_size)
        how = " (train.grad_accum derived from train.global_batch)" if t.global_batch and t.grad_accum is None else ""
        return (f"global batch {t.micro_batch * accum * world_size} = micro {t.micro_batch} x accum {accum} x "
                f"{world_size} ranks{how}")

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


def identity(cfg: Config, mode: str) -> dict:
    """What a checkpoint of this run must agree with to be resumed by it (and what the checkpoint
    records): the architecture, ZeRO stage, optimizer, pretrain/finetune mode and the config."""
    return {"model_spec": cfg.model.spec().to_dict(), "zero_stage": cfg.zero.stage, "optimizer": cfg.optim.name,
            "mode": mode, "config": cfg.to_dict()}
