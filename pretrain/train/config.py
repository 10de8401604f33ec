"""Run configuration: frozen dataclasses per concern, loaded from YAML plus dotted overrides.

``load_config("configs/x.yaml", ["model.depth=2", "train.steps=10"])`` returns a validated
:class:`Config`. Every mistake (unknown key, wrong type, impossible value) raises
:class:`UserError` with one line naming the key, the value and the fix. ``to_dict`` gives the
resolved config that is written next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pretrain.core.errors import UserError
from pretrain.model.vit import ViTSpec, spec_for


def _fail(key: str, value, fix: str) -> typing.NoReturn:
    raise UserError(f"config {key}={value!r}: {fix}")


def _check(cond: bool, key: str, value, fix: str) -> None:
    if not cond:
        _fail(key, value, fix)


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
    name: str = "vit_b16"
    img_size: int = 224
    patch_size: int | None = None  # None: the variant's own
    num_classes: int = 1000
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    heads: int | None = None
    representation_size: int | str | None = "auto"  # "auto" = width (pre-logits); None = linear head
    pool: str = "cls"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    head_bias_init: float = 0.0
    act_ckpt: bool = False
    compile: bool = False
    require_flash: bool = False

    def __post_init__(self):
        try:
            spec = self.spec()
        except ValueError as err:
            _fail("model.name", self.name, str(err))
        _check(spec.img_size > 0 and spec.img_size % spec.patch_size == 0, "model.img_size", self.img_size,
               f"must be a positive multiple of the patch size {spec.patch_size}")
        _check(spec.width % spec.heads == 0, "model.heads", spec.heads,
               f"must divide the width {spec.width}")
        _check(self.num_classes >= 0, "model.num_classes", self.num_classes, "must be >= 0")
        _check(self.pool in ("cls", "gap"), "model.pool", self.pool, "use 'cls' or 'gap'")
        rep = self.representation_size
        _check(rep is None or rep == "auto" or (isinstance(rep, int) and rep > 0),
               "model.representation_size", rep, "use 'auto' (= width), a positive int, or null")
        for key in ("dropout", "attn_dropout"):
            v = getattr(self, key)
            _check(0.0 <= v < 1.0, f"model.{key}", v, "must be in [0, 1)")

    def spec(self) -> ViTSpec:
        return spec_for(
            self.name, img_size=self.img_size, patch_size=self.patch_size, num_classes=self.num_classes,
            width=self.width, depth=self.depth, mlp_dim=self.mlp_dim, heads=self.heads,
            representation_size=self.representation_size, pool=self.pool, dropout=self.dropout,
            attn_dropout=self.attn_dropout, head_bias_init=self.head_bias_init, act_ckpt=self.act_ckpt,
        )


@dataclass(frozen=True)
class DataConfig:
    train: str = "synthetic"  # "synthetic", a shard dir with index.json, a brace pattern or URLs
    val: str | None = "synthetic"
    workers: int = 4
    samples_per_epoch: int | None = None  # needed for shard lists without index.json
    val_samples: int = 512  # synthetic eval size; shards: the whole val split
    synthetic_classes: int | None = None  # None: model.num_classes
    multi_label: bool = False
    shuffle_buffer: int = 2000
    crop_scale_min: float = 0.05
    hflip: bool = True
    eval_crop_pct: float = 1.0
    max_bad_frac: float = 0.01

    def __post_init__(self):
        _check(bool(self.train), "data.train", self.train, "give 'synthetic' or a shard dir/pattern")
        _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        _check(0.0 < self.crop_scale_min <= 1.0, "data.crop_scale_min", self.crop_scale_min, "use (0, 1]")
        _check(0.0 < self.eval_crop_pct <= 1.0, "data.eval_crop_pct", self.eval_crop_pct, "use (0, 1]")
        _check(0.0 <= self.max_bad_frac <= 1.0, "data.max_bad_frac", self.max_bad_frac, "use [0, 1]")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 32
    grad_accum: int = 1
    global_batch: int | None = None  # if set, checked against micro_batch x grad_accum x world size
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int | None = None  # None: the whole val set
    loss: str = "softmax"  # "softmax" cross-entropy or "sigmoid" (multi-label)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True
    max_bad_steps: int = 5

    def __post_init__(self):
        for key in ("steps", "micro_batch", "grad_accum", "log_every"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"train.{key}", v, "must be a positive integer")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0 = at the end)")
        _check(self.loss in ("softmax", "sigmoid"), "train.loss", self.loss, "use 'softmax' or 'sigmoid'")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "use [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        if self.global_batch is not None:
            per_rank = self.micro_batch * self.grad_accum
            _check(self.global_batch % per_rank == 0, "train.global_batch", self.global_batch,
                   f"must be a multiple of micro_batch x grad_accum = {per_rank}")

    def check_world(self, world_size: int) -> None:
        """Global batch = micro batch x grad accum x world size, checked before any allocation."""
        if self.global_batch is None:
            return
        got = self.micro_batch * self.grad_accum * world_size
        if got != self.global_batch:
            need = self.global_batch / (self.micro_batch * world_size)
            raise UserError(
                f"config train.global_batch={self.global_batch} != micro_batch {self.micro_batch} x "
                f"grad_accum {self.grad_accum} x world size {world_size} = {got}: set "
                f"train.grad_accum={need:g} (if whole), change train.micro_batch, or drop train.global_batch"
            )


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

    def __post_init__(self):
        _check(self.name in ("adamw", "sgd"), "optim.name", self.name, "use 'adamw' or 'sgd'")
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.decay in ("linear", "cosine", "constant"), "optim.decay", self.decay,
               "use 'linear', 'cosine' or 'constant'")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "must be in [0, optim.lr]")


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
class CheckpointConfig:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0 (0 = only at the end)")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    peak_flops: float | None = None  # per device; None: from the device table (null on CPU)
    tensorboard: bool = False
    progress: bool = True
    sample_keys: bool = False  # debug: each rank appends its batch keys per step to sample_keys_rank{r}.jsonl

    def __post_init__(self):
        _check(self.peak_flops is None or self.peak_flops > 0, "log.peak_flops", self.peak_flops,
               "must be > 0 FLOP/s, e.g. 989e12 for an H100")


@dataclass(frozen=True)
class FinetuneConfig:
    init: str | None = None  # weights to start from (any supported format)
    keep_pre_logits: bool = False
    pos_embed_mode: str = "bilinear"

    def __post_init__(self):
        _check(self.pos_embed_mode in ("bilinear", "bicubic"), "finetune.pos_embed_mode",
               self.pos_embed_mode, "use 'bilinear' (vit_jax) or 'bicubic'")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if self.data.multi_label and self.train.loss != "sigmoid":
            _fail("train.loss", self.train.loss, "multi-label data (data.multi_label=true) needs 'sigmoid'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


def _hint(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(options)}"


def _coerce(key: str, value, annotation):
    """Check (and gently convert) ``value`` to the field's declared type."""
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        _fail(key, value, f"must not be null (expected {annotation})")
    for opt in options:
        if opt is type(None):
            continue
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
    if isinstance(value, str):  # YAML left e.g. "1e-3" as a string
        for opt in options:
            if opt in (int, float):
                try:
                    return opt(value)
                except ValueError:
                    pass
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    _fail(key, value, f"expected {names}")


def _section_from(cls, key: str, values: dict):
    if not isinstance(values, dict):
        _fail(key, values, "expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise UserError(f"config: unknown key {key}.{name}: {_hint(name, known)}")
        kwargs[name] = _coerce(f"{key}.{name}", value, hints[name])
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from nested dicts (YAML content)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError("config: the file must hold a mapping of sections (run:, model:, train:, ...)")
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in fields(Config)]
    kwargs = {}
    for name, values in raw.items():
        if name not in sections:
            raise UserError(f"config: unknown section {name!r}: {_hint(name, sections)}")
        kwargs[name] = _section_from(hints[name], name, values or {})
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """``"model.depth=2"`` -> (["model", "depth"], 2); values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override {text!r}: write overrides as section.key=value, e.g. train.steps=100")
    path, _, value = text.partition("=")
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"override {text!r}: the key must be section.key, e.g. model.depth=2")
    return parts, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist: pass --config with a YAML recipe "
                        f"(see configs/, e.g. configs/demo_cpu.yaml)")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when None) + dotted overrides -> validated Config."""
    raw = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
