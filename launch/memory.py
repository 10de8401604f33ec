"""Per-GPU memory estimate for ZeRO-sharded ViT training in bf16 (pure functions).

**Model states** follow the ZeRO paper's accounting (Rajbhandari et al. 2020, sec. 3.1, 5.1) for
mixed-precision training: Ψ parameters, N data-parallel ranks, K bytes of optimizer state per
parameter (AdamW: fp32 master 4 + first moment 4 + second moment 4 = 12; SGD momentum: fp32
master 4 + momentum 4 = 8)::

    stage 0  (2 + 2 + K) Ψ            bf16 weights + bf16 grads + optimizer states on every GPU
    stage 1  (2 + 2) Ψ + K Ψ / N      optimizer states partitioned
    stage 2  2 Ψ + (2 + K) Ψ / N      + gradients partitioned
    stage 3  (2 + 2 + K) Ψ / N        + weights partitioned

so ViT-H/14 (632M parameters) with AdamW needs 16 B x 632M = 10.1 GB per GPU at stage 0.

**Activations** are what autograd keeps for the backward pass. For one pre-norm block
``x + Attn(LN(x))``, ``x + MLP(LN(x))`` in bf16 with SDPA FlashAttention (which keeps q, k, v,
its output and a logsumexp, never the T x T score matrix), micro batch B, T tokens, width D,
MLP width M and h heads, the saved tensors are (bytes)::

    LN1 input (block input)   2BTD       qkv input LN1(x)            2BTD
    q, k, v (qkv output)      6BTD       SDPA output = proj input    2BTD + 4BhT (logsumexp)
    LN2 input                 2BTD       fc1 input LN2(.)            2BTD
    GELU input (fc1 output)   2BTM       fc2 input GELU(.)           2BTM
    LN mean / rstd (fp32)     16BT       dropout masks (p > 0, bool) BT(2D + M)

    block = BT(16D + 4M) + 4BhT + 16BT

The flash kernels allocate their output as (B, T, h, hd), so the head merge before ``proj`` is a
view, not a copy. For M = 4D this is 32 BTD: Korthikanti et al.'s 34sbh less their two dropout
masks, and without their 5as^2b score-matrix terms. ``tests/test_preflight.py`` checks the
formula against the tensors autograd actually saves for a real block.

Outside the blocks: the image (2 x 3 x S^2 per sample, kept by the patch-embedding conv), the
final LayerNorm input (2BTD) and fp32 logits with their gradient (8 B x classes per sample).
Without activation checkpointing every block keeps its tensors (L x block). With per-block
checkpointing only the block inputs are kept (L x 2BTD) plus one block recomputed during its
backward. Either way the backward of one block holds gradient buffers at once: the residual
gradient (2BTD) plus the larger of the MLP's (4BTM) and attention's (dq, dk, dv and the fused
qkv gradient, 12BTD).

**Buffers**: ZeRO's reduce and gather/prefetch buckets, 2 x min(bucket, Ψ) bf16 elements.
**Allowance**: a fixed 2 GiB for the CUDA context, cuBLAS/cuDNN workspaces and NCCL channels.
DeepSpeed buffers outside the paper's accounting (e.g. an fp32 gradient accumulator) are not
modelled; the preflight asks for 10% headroom on top of the total for them and for allocator
fragmentation. All sizes are bytes; the report uses GiB (2^30 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.checkpoint.layout import OPTIMIZER_STATE_BYTES
from pretrain.model.costs import param_count
from pretrain.model.vit import ViTSpec
from pretrain.train.config import Config

GIB = 1 << 30
CUDA_ALLOWANCE = 2 * GIB


def model_state_bytes(params: int, stage: int, world_size: int, optim: str = "adamw") -> dict[str, int]:
    """Per-GPU bytes of ``weights``, ``grads`` and ``optimizer`` states under ZeRO ``stage``."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0..3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    k = OPTIMIZER_STATE_BYTES[optim]
    n = world_size
    weights = 2 * params / (n if stage >= 3 else 1)
    grads = 2 * params / (n if stage >= 2 else 1)
    optimizer = k * params / (n if stage >= 1 else 1)
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}


def block_activation_bytes(batch: int, seq_len: int, width: int, mlp_dim: int, heads: int,
                           dropout: bool = False) -> int:
    """Bytes one pre-norm ViT block keeps for backward in bf16 with flash SDPA (module docstring)."""
    bt = batch * seq_len
    total = bt * (16 * width + 4 * mlp_dim) + 4 * batch * heads * seq_len + 16 * bt
    if dropout:
        total += bt * (2 * width + mlp_dim)
    return total


def activation_bytes(spec: ViTSpec, batch: int, act_ckpt: bool | float, dropout: bool = False) -> dict[str, int]:
    """Per-GPU activation bytes at micro batch ``batch``: ``blocks``, ``outside`` (image, final
    norm, logits) and ``backward`` (gradient buffers of the block being backpropagated);
    ``act_ckpt``: True, False or the fraction of blocks recomputed (they keep only their input);
    ``dropout``: the blocks keep dropout masks."""
    b, t, d, m = batch, spec.seq_len, spec.width, spec.mlp_dim
    block = block_activation_bytes(b, t, d, m, spec.heads, dropout=dropout)
    recomputed = round(spec.depth * (1.0 if act_ckpt is True else float(act_ckpt)))  # False -> 0
    kept = spec.depth - recomputed
    blocks = recomputed * 2 * b * t * d + kept * block + (block if recomputed else 0)
    outside = 2 * b * 3 * spec.img_size**2 + 2 * b * t * d + 8 * b * max(spec.num_classes, 1)
    backward = 2 * b * t * d + max(4 * b * t * m, 12 * b * t * d)
    return {"blocks": blocks, "outside": outside, "backward": backward}


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes by component; ``total`` is what must fit in the GPU."""

    params: int
    stage: int
    world_size: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    allowance: int

    @property
    def model_states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers + self.allowance

    def breakdown(self) -> list[tuple[str, float]]:
        """(component, GiB) rows, total last."""
        rows = [("bf16 weights", self.weights), ("bf16 grads", self.grads),
                ("optimizer states", self.optimizer), ("activations", self.activations),
                ("ZeRO buckets", self.buffers), ("CUDA context/workspace", self.allowance),
                ("total", self.total)]
        return [(name, value / GIB) for name, value in rows]


def estimate_memory(cfg: Config, world_size: int) -> MemoryEstimate:
    """Per-GPU memory of training ``cfg`` on ``world_size`` data-parallel ranks."""
    spec = cfg.model.spec()
    params = param_count(spec)
    states = model_state_bytes(params, cfg.zero.stage, world_size, cfg.optim.name)
    acts = activation_bytes(spec, cfg.train.micro_batch, cfg.model.act_ckpt, dropout=cfg.model.dropout > 0)
    bucket = int(cfg.zero.bucket_mb * 1e6)
    return MemoryEstimate(
        params=params, stage=cfg.zero.stage, world_size=world_size, **states,
        activations=sum(acts.values()), buffers=2 * 2 * min(bucket, params), allowance=CUDA_ALLOWANCE,
    )
