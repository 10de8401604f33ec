"""The one place that imports DeepSpeed: config generation, initialize, step, save/load.

The DeepSpeed JSON is generated from the run config (``build_ds_config``), optionally merged
with a user JSON (``zero.ds_config``); it is never maintained by hand beside the run config.
The optimizer is a torch optimizer built here (AdamW with decoupled weight decay, or SGD with
momentum for fine-tuning) whose learning rate the loop sets every step from a pure schedule.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from pretrain.checkpoint.layout import cpu_copy
from pretrain.core.errors import UserError
from pretrain.data.transforms import normalize
from pretrain.model.vit import ViTSpec
from pretrain.train.config import Config

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed import comm as ds_comm  # noqa: E402
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine  # noqa: E402


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(cfg: Config, world_size: int, *, load_universal: bool = False) -> dict:
    """DeepSpeed config for ``cfg`` on ``world_size`` ranks (user JSON merged last).

    ``load_universal``: the engine will be restored from a universal checkpoint (another world
    size); DeepSpeed must know before ``initialize``."""
    t, z = cfg.train, cfg.zero
    accum = t.accum_for(world_size)
    bucket = int(z.bucket_mb * 1e6)
    zero = {"stage": z.stage, "overlap_comm": z.overlap_comm and z.stage > 0,
            "contiguous_gradients": True, "reduce_bucket_size": bucket}
    if z.stage in (1, 2):
        zero["allgather_bucket_size"] = bucket
    if z.stage == 3:
        zero.update(zero3_knobs(cfg.model.spec()), stage3_gather_16bit_weights_on_model_save=False)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if z.ds_config:
        try:
            user = json.loads(Path(z.ds_config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"zero.ds_config {z.ds_config!r} is not readable JSON: {err}") from None
        ds = _merge(ds, user)
        fixed = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
        for key in fixed:
            if key in user and user[key] != ds[key]:
                raise UserError(f"zero.ds_config sets {key}={user[key]}, which contradicts the run config: "
                                f"set batch sizes with train.micro_batch / train.grad_accum instead")
    return ds


def zero3_knobs(spec: ViTSpec) -> dict:
    """ZeRO-3's gathering, sized for a ViT instead of DeepSpeed's defaults.

    The unit of work is one transformer block (4D^2 + 2DM + 9D + M parameters, 19.7M for ViT-H):
    the prefetch bucket holds one block, so the next block's weights arrive while the current one
    computes; at most three blocks are live and a gathered block is kept for reuse within three
    blocks (the backward's recompute under activation checkpointing). Parameters of up to 10 x
    width elements (biases, norms, the class token) stay whole on every rank: gathering hundreds of
    tiny tensors costs more in latency than they take in memory."""
    d, m = spec.width, spec.mlp_dim
    block = 4 * d * d + 2 * d * m + 9 * d + m
    return {"stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 3 * block,
            "stage3_max_reuse_distance": 3 * block, "stage3_param_persistence_threshold": 10 * d}


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Join the process group (NCCL on GPU, gloo on CPU) from torchrun-style env variables.
    A dead peer ends collectives after ``timeout_s`` seconds (``run.timeout_s``) instead of
    hanging forever; a peer whose process exits is usually noticed at once (closed connection)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed creates its data-parallel groups with torch's default timeout (30 min), not the
    # world group's: make that default ours so every collective honours run.timeout_s
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world = ds_comm.get_rank(), ds_comm.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def layer_id(name: str, depth: int) -> int:
    """Depth position of a parameter for layer-wise LR decay: 0 for the embeddings (patch
    embedding, position embedding, class token, the LayerNorm before the blocks), i + 1 for block
    i, depth + 1 for the rest (final norm, projection, pre-logits, head)."""
    if name.startswith(("patch_embed.", "pos_embed", "cls_token", "norm_pre.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups. Weight decay only on matrices: none on biases, norms, position
    embeddings and class token. With ``layer_decay`` < 1 (fine-tuning; the BEiT / MAE / timm rule)
    every group also carries ``lr_scale`` = layer_decay ** (depth + 1 - :func:`layer_id`): block i
    of a depth-L model learns at base x decay^(L - i), the embeddings at base x decay^(L + 1), the
    final norm and head at base. Every trainable parameter is in exactly one group."""
    skip = getattr(model, "no_weight_decay", lambda: set())()
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = p.ndim > 1 and name not in skip
        lid = layer_id(name, depth) if layer_decay != 1.0 else 0
        group = groups.setdefault((lid, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                    "lr_scale": layer_decay ** (depth + 1 - lid) if layer_decay != 1.0
                                                    else 1.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.layer_decay)
    fused = {"fused": True} if torch.cuda.is_available() else {}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **fused)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, **fused)


class FileCollector(CheckpointEngine):
    """DeepSpeed's file writer, replaced: every file a save produces is written now (``defer``
    False) or kept for a background writer (``defer`` True: the state DeepSpeed hands over holds
    the live parameters and optimizer moments, so it is snapshotted into CPU copies here, before
    the next step changes them); either way ``files`` lists ``(state or None, path)`` for this
    rank."""

    def __init__(self):
        super().__init__()
        self.defer = False
        self.files: list[tuple[object | None, Path]] = []

    def create(self, info) -> None:
        self.files = []

    def save(self, state_dict, path: str) -> None:
        if self.defer:
            self.files.append((cpu_copy(state_dict), Path(path)))
        else:
            torch.save(state_dict, path)
            self.files.append((None, Path(path)))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True


class Engine:
    """A DeepSpeed engine around the model with our step semantics.

    One ``train_step`` consumes ``grad_accum`` micro batches and applies one optimizer step;
    it returns the mean loss as a tensor (no host sync) and leaves the grad norm readable.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False):
        self.cfg = cfg
        self.ds_config = build_ds_config(cfg, world_size, load_universal=load_universal)
        optimizer = build_optimizer(model, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self.files = FileCollector()
        self.engine.checkpoint_engine = self.files

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        """The step's learning rate, scaled per group by its ``lr_scale`` (layer-wise decay)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def forward(self, images: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits, or with ``pre_logits=True`` the features before the head (through the engine's
        top-level forward, so ZeRO-3 gathers the partitioned parameters)."""
        if pre_logits:
            return self.engine(self.to_device(images), pre_logits=True)
        return self.engine(self.to_device(images))

    def model_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on inputs already on the device in the compute dtype (see :meth:`to_device`)."""
        return self.engine(x)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Images on the device in the compute dtype: uint8 pixels are copied as uint8 (non-blocking
        from pinned memory) and normalised there; float images are already normalised."""
        x = images.to(self.device, non_blocking=True)
        return normalize(x, dtype=self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights. DeepSpeed skips a step whose
        gradients are non-finite (ZeRO-1/2: ``bf16.check_grad_overflow``, on by default; ZeRO-3: a
        non-finite global grad norm), the same decision on every rank."""
        return bool(self.engine.was_step_applied())

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, save_dir: Path, tag: str, client_state: dict,
             defer: bool = False) -> list[tuple[object | None, Path]]:
        """Every rank's shards of model and optimizer state for ``save_dir/tag``: written now, or
        with ``defer`` returned as ``(CPU state, path)`` for a background writer. Returns this
        rank's files either way (state None when written)."""
        self.files.defer = defer
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        return list(self.files.files)

    def load(self, load_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
        path, client = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=True, load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False, load_module_only=not load_optimizer)
        if path is None:
            raise UserError(f"checkpoint {load_dir}/{tag} could not be loaded by DeepSpeed: it is incomplete "
                            f"or was written by another setup; pass --resume with another checkpoint or "
                            f"--no-resume")
        return client or {}

    def load_universal(self, universal_dir: Path) -> dict:
        """Restore weights and optimizer moments from a DeepSpeed universal checkpoint (any world
        size); the engine must have been built with ``load_universal=True``."""
        universal_dir = Path(universal_dir)
        return self.load(universal_dir.parent, universal_dir.name)

    def partitioned_numel(self) -> int:
        """Parameters this rank holds (under ZeRO-3 a partition, otherwise the whole model)."""
        total = 0
        for p in self.engine.module.parameters():
            total += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return total


def barrier() -> None:
    ds_comm.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    ops = {"sum": ds_comm.ReduceOp.SUM, "max": ds_comm.ReduceOp.MAX, "min": ds_comm.ReduceOp.MIN}
    ds_comm.all_reduce(tensor, op=ops[op])
    return tensor


def destroy() -> None:
    """Leave the process group (benchmark children and tests that build engines in turn)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Comm:
    """The few collectives the loop and checkpointing need (works before/without an engine)."""

    @staticmethod
    def barrier() -> None:
        ds_comm.barrier()

    @staticmethod
    def all_gather_object(obj) -> list:
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    @staticmethod
    def broadcast_object(obj, src: int = 0):
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=src)
        return holder[0]
