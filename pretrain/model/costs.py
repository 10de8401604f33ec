"""What a model costs: parameters, forward MACs, training FLOPs, MFU (pure functions).

MACs are counted by running the real forward under ``torch.utils.flop_counter`` on the meta
device, so nothing is allocated and the count follows the model code (SDPA included).
Training FLOPs per image = 6 x forward MACs (forward 2, backward 4; activation recompute is not
counted, as in the PaLM/MFU convention).

FP8 (``model.fp8``) changes the precision of the blocks' Linear layers, not the FLOP count: the
counts here are those of the plain model, with or without FP8. What changes is the peak those
FLOPs are measured against. MFU with FP8 is the share of the device's peak *for this mix of
precisions*: the ``fp8_flops_share`` of the FLOPs (the blocks' Linear layers; 96.6% for ViT-H/14 at
224) at the FP8 peak, the rest (attention, patch embedding, head) at the bf16 peak
(:func:`mixed_peak`). So an FP8 run's MFU is lower than a bf16 run's at the same images/s, and
compares FP8 runs with what the hardware can do; the speed-up over bf16 is the ratio of images/s
(``vitscale bench train`` reports it as ``speedup_vs_bf16``).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model.fp8 import is_block_linear
from pretrain.model.vit import ViTSpec, build_model

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
    "B200": 2250e12,
}
# Dense FP8 peak / dense bf16 peak: 2 on every FP8-capable NVIDIA GPU (L40S 733/362, RTX 4090 330/165,
# H100 and H200 1979/989, B200 4500/2250 TFLOP/s), so one table serves both precisions.
FP8_PEAK_RATIO = 2.0


@functools.lru_cache(maxsize=64)
def model_costs(spec: ViTSpec, patch_dropout: float = 0.0) -> dict:
    """Parameter counts, forward GMACs and training TFLOPs per image for ``spec``; with
    ``patch_dropout`` the training FLOPs are those of the tokens a training image keeps (the
    forward is counted in training mode), while ``gmacs_fwd`` stays the full (eval) forward.
    ``fp8_flops_share``: the share of the training FLOPs in the blocks' Linear layers, the ones
    ``model.fp8`` runs in FP8 (see the module docstring)."""
    model = build_model(spec, device="meta", patch_dropout=patch_dropout)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("head.", "pre_logits.")))
    macs, linear_macs = _forward_macs(model.eval(), spec)
    train_macs, linear_macs = _forward_macs(model.train(), spec) if patch_dropout else (macs, linear_macs)
    return {
        "params": total,
        "params_backbone": total - head,
        "gmacs_fwd": macs / 1e9,
        "train_tflops_per_image": 6 * train_macs / 1e12,
        "fp8_flops_share": linear_macs / train_macs,
        "seq_len": spec.seq_len,
        "head_dim": spec.head_dim,
    }


def _forward_macs(model: torch.nn.Module, spec: ViTSpec) -> tuple[float, float]:
    """Forward MACs of one image: all of them, and those of the blocks' Linear layers."""
    x = torch.empty(1, 3, spec.img_size, spec.img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    root = type(model).__name__
    counts = counter.get_flop_counts()  # by module: "VisionTransformer.blocks.0.attn.qkv" -> {op: flops}
    linear = sum(sum(counts.get(f"{root}.{name}", {}).values())
                 for name, m in model.named_modules() if is_block_linear(m, name))
    return counter.get_total_flops() / 2, linear / 2


def param_count(spec: ViTSpec) -> int:
    """Number of parameters of ``build_model(spec)``, in closed form (no model is built)."""
    d, m, p = spec.width, spec.mlp_dim, spec.patch_size
    n = 3 * p * p * d + spec.seq_len * d + 2 * d
    n += d if spec.patch_bias else 0
    n += 2 * d if spec.pre_norm else 0
    n += d if spec.pool == "cls" else 0
    n += spec.depth * (4 * d * d + 2 * d * m + 9 * d + m)
    n += d * spec.proj_dim if spec.proj_dim else 0
    f, rep = spec.feature_dim, spec.representation_size
    if rep:
        n += f * rep + rep
    if spec.num_classes:
        n += (rep or f) * spec.num_classes + spec.num_classes
    return n


def peak_flops_for(device_name: str) -> float | None:
    """Table lookup of dense bf16 peak FLOP/s for a CUDA device name; None if unknown."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def mixed_peak(bf16_peak: float | None, fp8_share: float) -> float | None:
    """Peak FLOP/s of a step whose ``fp8_share`` of FLOPs may run at the FP8 peak
    (:data:`FP8_PEAK_RATIO` x ``bf16_peak``) and the rest at the bf16 peak: the time-weighted
    (harmonic) mix, ``bf16_peak / ((1 - s) + s / ratio)``. ``fp8_share`` 0 (FP8 off) gives
    ``bf16_peak``; None stays None."""
    if not bf16_peak:
        return bf16_peak
    return bf16_peak / ((1.0 - fp8_share) + fp8_share / FP8_PEAK_RATIO)


def mfu(images_per_s: float, train_flops_per_image: float, peak_flops: float | None,
        world_size: int) -> float | None:
    """Model FLOPs utilisation over all devices, or None without a known peak."""
    if not peak_flops:
        return None
    return images_per_s * train_flops_per_image / (peak_flops * world_size)
